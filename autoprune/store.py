"""The trial store: every proposal of every searcher, kept in Optuna storage.

A campaign's trials live in an Optuna :class:`~optuna.storages.RDBStorage` — a SQLite file by default, a
PostgreSQL URL when several workers share one campaign. There is one Optuna study per
``(campaign, searcher, seed)``; every proposal a searcher makes is one Optuna trial whose user attributes hold
the candidate (``widths``, ``bits``), its closed-form cost (``macs``, ``params``, ``bytes``), its evaluation
(``accuracy``, ``loss``), the ``reward``, wall-clock ``seconds``, ``searcher``, ``seed``, a ``state`` and a
``reason``. Searchers keep small resumable state (baseline progress, RL agent checkpoint paths, reward
baselines) as JSON in the study's user attributes and larger files in :meth:`TrialStore.artifact_dir`.

Nothing here knows how candidates are proposed; the searchers (``autoprune.agents``) write through
:meth:`TrialStore.study` and :meth:`TrialStore.finish`.

Searchers that propose without ``trial.suggest_*`` store their candidate as Optuna parameters with
:func:`record_candidate_params` (the same names the Optuna searchers use), so that optuna-dashboard plots every
searcher on the same axes.

This is the only module that uses Optuna's private attributes (a study's storage and id, a trial's id), behind
:func:`interrupt_trial`, :func:`ask_with_attrs` and :func:`record_candidate_params`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from autoprune.problem import SearchSpace

from autoprune._imports import is_available
from autoprune.errors import AutoPruneError, ConfigError
from autoprune.types import Candidate, CostReport, EvalResult, TrialRecord

#: Trial ``state`` values written by :meth:`TrialStore.finish` (the Optuna state is derived from them).
STATES = ("complete", "infeasible", "pruned", "failed", "interrupted")

_OPTUNA_STATE = {
    "complete": TrialState.COMPLETE,
    "infeasible": TrialState.COMPLETE,  # told with constraint values > 0 so samplers learn the boundary
    "pruned": TrialState.PRUNED,
    "failed": TrialState.FAIL,
    "interrupted": TrialState.FAIL,
}
#: Trial states that count towards a searcher's candidate budget (an interrupted trial is proposed again).
COUNTED_STATES = ("complete", "infeasible", "pruned", "failed")
#: User attributes :meth:`TrialStore.finish` has always written on every trial (``constraints`` and ``feasible`` too
#: when the campaign has a budget; attributes added later, such as ``latency_ms``, may be missing from older
#: stores): the record that ``report`` and ``export`` read, required of a trial recovered by ``autoprune.salvage``.
RECORD_ATTRS = ("widths", "bits", "key", "macs", "params", "bytes", "bitops", "accuracy", "loss", "eval_seconds",
                "evaluator", "reward", "seconds", "searcher", "seed", "state", "reason")

_INT, _REAL = (int,), (int, float)
_NUMBERS = {"macs": _INT, "params": _INT, "bytes": _INT, "bitops": _INT, "seed": _INT, "accuracy": _REAL,
            "loss": _REAL, "eval_seconds": _REAL, "reward": _REAL, "seconds": _REAL, "latency_ms": _REAL,
            "score": _REAL}


def record_is_consistent(attrs: Mapping[str, Any]) -> bool:
    """Whether a finished trial's record is consistent: its candidate rebuilds to its stored key, numbers are numbers.

    SQLite keeps no checksums, so a damaged byte inside a value can only be caught this way (the key is a hash
    of the widths and bits).
    """
    try:
        cand = Candidate.from_dict({"widths": attrs["widths"] or {}, "bits": attrs["bits"] or {}})
        if cand.key() != attrs["key"] or not all(isinstance(w, int) for w in cand.widths.values()):
            return False
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    for name, kind in _NUMBERS.items():
        value = attrs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            return False
    return all(attrs.get(k) is None or isinstance(attrs[k], str) for k in ("searcher", "evaluator", "reason"))


_STATE_KEY = "autoprune.state."
#: ``location`` of a store kept in this process only.
MEMORY = ":memory:"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _is_url(location: str) -> bool:
    return "://" in location


def _probe_writable(directory: Path) -> None:
    """Create and remove a file in ``directory`` (``os.access`` lies for root and on read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".autoprune-probe-", dir=directory)
    except OSError as exc:
        raise AutoPruneError(
            f"the trial store directory {directory} is not writable ({exc.strerror or exc})",
            hint="choose a writable results directory (campaign `output:`/`--out`) or fix its permissions",
        ) from exc
    os.close(fd)
    os.unlink(name)


def _sqlite_url(path: Path) -> str:
    path = path.expanduser().resolve()
    if path.is_dir():
        raise AutoPruneError(f"the trial store path {path} is a directory", hint="pass a file such as trials.db")
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AutoPruneError(f"cannot create the trial store directory {parent} ({exc.strerror or exc})",
                                 hint="choose a writable results directory") from exc
    if not parent.is_dir():
        raise AutoPruneError(f"the trial store path {path} lies under {parent}, which is not a directory",
                             hint="choose a path inside an existing directory")
    _probe_writable(parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise AutoPruneError(f"the trial store file {path} is read-only", hint="fix its permissions or copy it")
    return f"sqlite:///{path}"


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for error messages)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _postgres_driver(url: str) -> str:
    """Pin a PostgreSQL URL without a driver to one that imports (SQLAlchemy 2.1 defaults to psycopg 3)."""
    scheme, rest = url.split("://", 1)
    if "+" in scheme:
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if is_available(module):
            return f"postgresql+{driver}://{rest}"
    raise AutoPruneError(f"the trial store URL {_redact(url)} needs a PostgreSQL driver (psycopg or psycopg2)",
                         hint="install the `postgres` extra: pip install autoprune[postgres]")


def _tune_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """Write-ahead logging with ``synchronous=NORMAL``: a trial writes ~20 attributes, each its own commit.

    WAL keeps the file consistent if a process dies (only a power cut can lose the last commits) and lets
    readers (``autoprune report``) work while a search writes.
    """
    from sqlalchemy import event

    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", _pragmas)
    storage.engine.dispose()  # connections opened while creating the tables predate the listener


#: Errors two processes get when they create the same Optuna schema at the same moment.
_CREATION_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "IntegrityError")


def _is_creation_race(exc: BaseException) -> bool:
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.IntegrityError):
        return True
    return isinstance(exc, sa_exc.SQLAlchemyError) and any(m in str(exc) for m in _CREATION_RACE)


@contextlib.contextmanager
def _creation_lock(url: str, timeout: float) -> Iterator[None]:
    """Serialise schema creation of one SQLite file across processes (``fcntl`` lock on ``<file>.lock``).

    Two processes opening a new store at the same moment would otherwise both create Optuna's tables and
    both insert its alembic version row (an ``IntegrityError`` for one of them). A no-op for server URLs and
    where ``fcntl`` is missing (then :func:`_open_storage`'s bounded retries cover the race).
    """
    if not url.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path = url[len("sqlite:///"):] + ".lock"
    try:
        fh = open(lock_path, "a+")  # noqa: SIM115 - held for the duration of the block
    except OSError:
        yield  # an unwritable location is reported by the open itself
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AutoPruneError(
                        f"timed out after {timeout:g} s waiting for another process to create the trial store "
                        f"{_redact(url)}", hint="check for a hung autoprune process, or raise storage_timeout"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        fh.close()  # releases the lock


SQLITE_HEADER = b"SQLite format 3\x00"
_OPTUNA_TABLES = {"studies", "trials", "alembic_version"}
#: Every table of Optuna's schema: a store holding some of them, and no trial, is one whose creation was cut short
#: (a full disk, a read-only file system, a killed process); Optuna creates the missing ones.
_OPTUNA_SCHEMA = _OPTUNA_TABLES | {
    "study_directions", "study_user_attributes", "study_system_attributes", "trial_user_attributes",
    "trial_system_attributes", "trial_params", "trial_values", "trial_intermediate_values", "trial_heartbeats",
    "version_info"}


def _sqlite_hint(path: str) -> str:
    name = Path(path).name
    return (f"the file is read, never written, while it is damaged: restore {name} from a backup, or move it aside "
            f"(mv {name} {name}.damaged) to start the campaign's store afresh; `autoprune report DIR --salvage` "
            "and `autoprune export DIR --salvage` read the trials that survive (read-only)")


def check_sqlite_file(path: str | os.PathLike[str]) -> None:
    """Refuse a SQLite trial store that is damaged or not Optuna's, before anything opens it for writing.

    Checked, read-only: the file header, SQLite's ``PRAGMA quick_check`` and Optuna's tables (Optuna itself then
    refuses a schema newer than it knows). A missing or empty file is fine (a new store).

    Raises:
        AutoPruneError: Naming the file and what is wrong with it, with a hint for a local SQLite file.
    """
    import sqlite3

    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return
    with open(p, "rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise AutoPruneError(f"the trial store {p} is not a SQLite database (its first bytes are {header[:16]!r})",
                             hint=_sqlite_hint(str(p)))
    try:
        con = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise AutoPruneError(f"the trial store {p} cannot be opened: {exc}", hint=_sqlite_hint(str(p))) from None
    con.text_factory = lambda raw: raw.decode("utf-8", "replace")  # a damaged schema page may hold any bytes
    try:
        problems = [r[0] for r in con.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise AutoPruneError(f"the trial store {p} is damaged (SQLite's quick_check: {'; '.join(problems)})",
                                 hint=_sqlite_hint(str(p)))
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        half_created = "studies" in tables and tables <= _OPTUNA_SCHEMA and (
            "trials" not in tables or con.execute("SELECT count(*) FROM trials").fetchone()[0] == 0)
        if tables and not tables >= _OPTUNA_TABLES and not half_created:
            shown = ", ".join(sorted(tables)[:6])
            raise AutoPruneError(f"the trial store {p} is another program's database (tables: {shown}), not an "
                                 "Optuna trial store", hint="point the campaign at another file (output_dir or "
                                 "storage); autoprune never writes into a database it did not create")
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise AutoPruneError(f"the trial store {p} is damaged: {exc}", hint=_sqlite_hint(str(p))) from None
    except UnicodeDecodeError:  # SQLite's own message quotes damaged bytes
        raise AutoPruneError(f"the trial store {p} is damaged (SQLite's quick_check fails)",
                             hint=_sqlite_hint(str(p))) from None
    finally:
        con.close()


def _open_storage(url: str, *, timeout: float = 60.0, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Open (creating the schema if needed) the Optuna storage at ``url``.

    SQLite waits up to ``timeout`` seconds for a lock held by another process; PostgreSQL gives up connecting
    after ``min(timeout, 10)`` seconds. A schema being created by another process at the same moment is
    retried (``attempts`` times, with back-off); any other failure is an :class:`AutoPruneError`.
    """
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes may write one SQLite file: wait for the lock (bounded) instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": float(timeout)}}
    elif url.startswith(("postgresql", "postgres")):
        engine_kwargs = {"connect_args": {"connect_timeout": max(1, int(min(timeout, 10)))}, "pool_pre_ping": True}
        url = _postgres_driver(url)
    if url.startswith("sqlite:///"):
        check_sqlite_file(url[len("sqlite:///"):])
    for attempt in range(attempts):
        try:
            with _creation_lock(url, timeout):
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
                if url.startswith("sqlite"):
                    _tune_sqlite(storage)
            return storage
        except ImportError as exc:
            raise AutoPruneError(f"the trial store URL {_redact(url)} needs a database driver that cannot be "
                                 f"imported ({exc.__cause__ or exc})",
                                 hint="for PostgreSQL install the `postgres` extra: pip install autoprune[postgres]"
                                 ) from exc
        except AutoPruneError:
            raise
        except Exception as exc:  # sqlalchemy OperationalError/ArgumentError, driver errors
            if attempt + 1 < attempts and _is_creation_race(exc):
                time.sleep(0.2 * (attempt + 1))  # another process is creating the same schema right now
                continue
            if url.startswith("sqlite"):
                raise AutoPruneError(f"cannot open the trial store {_redact(url)}: {_first_line(exc)}",
                                     hint="check that the file and its directory are readable and writable and that "
                                     "no other program holds a lock on it") from exc
            raise AutoPruneError(
                f"cannot open the trial store {_redact(url)}: {_first_line(exc)}",
                hint="check that the database server is running and reachable and the URL (user, host, port, "
                "database) is right, and that no other program holds a lock on it; or use a SQLite file path",
            ) from exc
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def storage_error(exc: BaseException, where: str) -> AutoPruneError | None:
    """The user-facing error for a failed store write/read (locked database, full disk, read-only file,
    lost server), or ``None`` when ``exc`` is not a storage problem.

    Every trial that finished before the failure stays in the store; the trial being written is left
    running and is marked ``interrupted`` (and proposed again) by the next run.
    """
    import errno

    from sqlalchemy import exc as sa_exc

    hint = ("finished trials are kept; free the disk / release the lock / restore access to the database, then "
            "run the same command again to resume")
    if isinstance(exc, AutoPruneError):
        return None
    if isinstance(exc, optuna.exceptions.StorageInternalError | sa_exc.PendingRollbackError):
        # Optuna wraps the database's own error; a server lost mid-query shows as a pending rollback whose
        # context is the driver's error: follow the chain to it
        seen: BaseException | None = exc
        while seen is not None and not isinstance(seen, sa_exc.OperationalError | sa_exc.InterfaceError |
                                                  sa_exc.DatabaseError):
            seen = seen.__cause__ or seen.__context__
        if seen is None and isinstance(exc, optuna.exceptions.StorageInternalError):
            return AutoPruneError(f"the trial store {where} failed: {_first_line(exc)}", hint=hint)
        exc = seen if seen is not None else exc
    if isinstance(exc, sa_exc.PendingRollbackError):
        return AutoPruneError(f"the connection to the trial store {where} was lost: {_first_line(exc)}", hint=hint)
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.DatabaseError):
        text = _first_line(getattr(exc, "orig", None) or exc)
        if "locked" in text:
            return AutoPruneError(f"the trial store {where} stayed locked by another connection: {text}", hint=hint)
        return AutoPruneError(f"writing to the trial store {where} failed: {text}", hint=hint)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO):
        return AutoPruneError(f"writing campaign files failed ({exc.strerror or exc}): {exc.filename or where}",
                              hint=hint)
    return None


@contextlib.contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Turn a storage failure inside the block (see :func:`storage_error`) into its :class:`AutoPruneError`;
    anything else passes through unchanged."""
    try:
        yield
    except Exception as exc:
        err = storage_error(exc, where)
        if err is None:
            raise
        raise err from exc


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class TrialStore:
    """All trials of one campaign, on Optuna storage.

    Args:
        location: A SQLite file path (created with its parent directories), a database URL such as
            ``postgresql://user@host:5432/db`` or ``sqlite:///path.db``, or ``":memory:"`` for a store that
            lives only in this process (Optuna's in-memory storage; for tests and quick experiments — its
            trials are lost when the process ends).
        campaign: Campaign name; study names are ``"<campaign>/<searcher>/seed<seed>"``.
        artifact_root: Directory for searcher files (RL checkpoints, replay buffers, trained networks).
            Defaults to ``<dir of the SQLite file>/artifacts/<campaign>`` (campaigns sharing one database never
            share files), for a server URL ``./results/<campaign>/artifacts``, and a fresh temporary directory
            for ``":memory:"``.
        timeout: Seconds to wait for a database lock held by another process (SQLite) or for a server to
            answer (PostgreSQL, at most 10) before failing with an :class:`AutoPruneError`.

    Raises:
        AutoPruneError: If the location is unwritable or the database cannot be reached.
    """

    def __init__(self, location: str | os.PathLike[str], *, campaign: str = "default",
                 artifact_root: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> None:
        if not _NAME_RE.match(campaign):
            raise ConfigError(f"campaign name {campaign!r} may use only letters, digits, '_', '-' and '.'",
                              hint="rename the campaign, e.g. resnet20-c10-50pct")
        self.campaign = campaign
        location = os.fspath(location)
        self.storage: optuna.storages.BaseStorage
        if location == MEMORY:
            self.url = MEMORY
            self.storage = optuna.storages.InMemoryStorage()
            self.artifact_root = Path(artifact_root) if artifact_root is not None else Path(
                tempfile.mkdtemp(prefix="autoprune-artifacts-"))
            return
        if _is_url(location):
            self.url = location
            if location.startswith("sqlite:///"):
                self.url = _sqlite_url(Path(location[len("sqlite:///"):]))
        else:
            self.url = _sqlite_url(Path(location))
        self.storage = _open_storage(self.url, timeout=timeout)
        if artifact_root is not None:
            root = Path(artifact_root)
        elif self.url.startswith("sqlite:///"):
            root = Path(self.url[len("sqlite:///"):]).parent / "artifacts" / campaign
        else:
            root = Path("results") / campaign / "artifacts"
        self.artifact_root = root

    def __repr__(self) -> str:
        return f"TrialStore({_redact(self.url)!r}, campaign={self.campaign!r})"

    # -- studies -------------------------------------------------------------------------------------
    def study_name(self, searcher: str, seed: int) -> str:
        """Name of the study holding ``searcher``'s trials for ``seed`` in this campaign."""
        return f"{self.campaign}/{searcher}/seed{int(seed)}"

    def study(self, searcher: str, seed: int, *, directions: Sequence[str] = ("maximize",),
              sampler: optuna.samplers.BaseSampler | None = None,
              pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
        """Create or load the study of ``(searcher, seed)``.

        Raises:
            ConfigError: If the study exists with different optimisation directions.
        """
        name = self.study_name(searcher, seed)
        study = optuna.create_study(storage=self.storage, study_name=name, load_if_exists=True,
                                    directions=list(directions),
                                    sampler=sampler or optuna.samplers.RandomSampler(seed=int(seed)),
                                    pruner=pruner or optuna.pruners.NopPruner())
        have = [d.name.lower() for d in study.directions]
        if have != [d.lower() for d in directions]:
            raise ConfigError(f"study {name!r} already exists with directions {have}, not {list(directions)}",
                              hint="use another campaign name or seed, or the objective the study was made with")
        if "searcher" not in study.user_attrs:
            study.set_user_attr("campaign", self.campaign)
            study.set_user_attr("searcher", searcher)
            study.set_user_attr("seed", int(seed))
        return study

    def study_names(self) -> list[str]:
        """Names of this campaign's studies."""
        prefix = f"{self.campaign}/"
        try:
            studies = self.storage.get_all_studies()
        except (ValueError, TypeError, LookupError, AttributeError, OverflowError) as exc:  # values Optuna can't read
            raise self._unreadable(f"its list of studies: {_first_line(exc)}") from exc
        return sorted(s.study_name for s in studies if s.study_name.startswith(prefix))

    def delete(self, searcher: str | None = None, seed: int | None = None) -> int:
        """Delete this campaign's studies (optionally only one searcher and/or seed); return how many."""
        n = 0
        for name in self.study_names():
            _, s, sd = name.split("/")
            if (searcher is None or s == searcher) and (seed is None or sd == f"seed{int(seed)}"):
                optuna.delete_study(study_name=name, storage=self.storage)
                n += 1
        return n

    # -- trials --------------------------------------------------------------------------------------
    @staticmethod
    def finish(study: optuna.Study, trial: optuna.Trial, *, candidate: Candidate, cost: CostReport | None,
               result: EvalResult | None, reward: float | None, seconds: float, searcher: str, seed: int,
               state: str = "complete", reason: str = "", values: Sequence[float] | None = None,
               constraints: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        """Record ``trial`` (asked from ``study``) with everything about its candidate, then tell Optuna.

        Args:
            study: The searcher's study.
            trial: The running trial.
            candidate: The candidate that was (or would have been) evaluated.
            cost: Its closed-form cost.
            result: Its evaluation, or ``None`` when it was not evaluated (infeasible, failed).
            reward: The scalar reward/objective, when there is one.
            seconds: Wall-clock seconds spent on this proposal (proposal + evaluation).
            searcher: Searcher name.
            seed: Searcher seed.
            state: One of :data:`STATES`.
            reason: Free text (why infeasible/pruned/failed; the phase of a baseline).
            values: Objective values told to Optuna for ``complete``/``infeasible`` trials.
            constraints: Constraint values by budget metric (``cost / limit - 1``; feasible when all are ≤ 0),
                also handed to Optuna so that constraint-aware samplers (TPE, GP, NSGA-II) use them.
            extra: More JSON-friendly user attributes.
        """
        if state not in _OPTUNA_STATE:
            raise ValueError(f"unknown trial state {state!r}; expected one of {STATES}")
        attrs: dict[str, Any] = {
            "widths": dict(candidate.widths),
            "bits": {k: v.to_dict() for k, v in candidate.bits.items()},
            "key": candidate.key(),
            "macs": cost.macs if cost else None,
            "params": cost.params if cost else None,
            "bytes": cost.bytes if cost else None,
            "bitops": cost.bitops if cost else None,
            "latency_ms": cost.latency_ms if cost else None,
            "accuracy": _finite(result.accuracy) if result else None,
            "score": _finite(result.score) if result and result.score is not None else None,
            "loss": _finite(result.loss) if result else None,
            "eval_seconds": result.seconds if result else None,
            "evaluator": result.evaluator if result else None,
            "reward": _finite(reward),
            "seconds": float(seconds),
            "searcher": searcher,
            "seed": int(seed),
            "state": state,
            "reason": reason,
        }
        if constraints is not None:
            named = {str(k): float(v) for k, v in constraints.items()}
            attrs["constraints"] = named
            attrs["feasible"] = all(v <= 0 for v in named.values())
            _set_constraints(study, trial, named)
        for k, v in (extra or {}).items():
            attrs[k] = v
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        ostate = _OPTUNA_STATE[state]
        if ostate == TrialState.COMPLETE:
            if values is None:
                raise ValueError("a complete trial needs objective values")
            study.tell(trial, [float(v) for v in values] if len(study.directions) > 1 else float(values[0]))
        else:
            study.tell(trial, state=ostate)

    @staticmethod
    def fail_running(study: optuna.Study, reason: str = "interrupted") -> int:
        """Mark trials of ``study`` left RUNNING by a killed process as interrupted; return how many.

        Only safe when one process owns the study, which holds for one ``(searcher, seed)`` per worker.
        """
        n = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            interrupt_trial(study, t, reason)
            n += 1
        return n

    @staticmethod
    def counted(study: optuna.Study) -> list[FrozenTrial]:
        """Finished trials of ``study`` that count towards the candidate budget, in trial order."""
        return [t for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and t.user_attrs.get("state") in COUNTED_STATES]

    def trials(self, searcher: str | None = None, seed: int | None = None) -> list[TrialRecord]:
        """Finished trials as :class:`TrialRecord` (study order, then trial number)."""
        return [_record(t) for _, t in self._iter_trials(searcher, seed) if t.state.is_finished()]

    def _iter_trials(self, searcher: str | None, seed: int | None) -> Iterator[tuple[str, FrozenTrial]]:
        """Every trial of the matching studies; a record that cannot be read, or a counted trial whose record
        is inconsistent (a file changed by another program), is an :class:`AutoPruneError`, not a traceback."""
        for name in self.study_names():
            parts = name.split("/")
            if len(parts) != 3:
                raise self._unreadable(f"a study named {name!r} that autoprune did not write")
            _, s, sd = parts
            if (searcher is None or s == searcher) and (seed is None or sd == f"seed{int(seed)}"):
                try:
                    trials = optuna.load_study(study_name=name, storage=self.storage).get_trials(deepcopy=False)
                except (ValueError, TypeError, LookupError, AttributeError, OverflowError) as exc:
                    raise self._unreadable(f"study {name}: {_first_line(exc)}") from exc
                for t in trials:
                    if (t.state.is_finished() and t.user_attrs.get("state") in COUNTED_STATES
                            and not (set(RECORD_ATTRS) <= set(t.user_attrs)
                                     and record_is_consistent(t.user_attrs))):
                        raise self._unreadable(f"study {name}, trial #{t.number}: its record is inconsistent "
                                               "(a missing value, a value of the wrong type, or a candidate "
                                               "that does not match its key)")
                    yield name, t

    def check_readable(self, searcher: str | None = None, seed: int | None = None) -> int:
        """Read every trial of the matching studies once (see :meth:`trials`); returns how many.

        Raises:
            AutoPruneError: A record that cannot be read (a store changed by another program), before a search
                builds on it.
        """
        return sum(1 for _ in self._iter_trials(searcher, seed))

    def _unreadable(self, what: str) -> AutoPruneError:
        return AutoPruneError(f"the trial store {_redact(self.url)} holds records that cannot be read ({what}); it "
                              "was changed by another program or is damaged",
                              hint="`autoprune report DIR --salvage` and `autoprune export DIR --salvage` read the "
                              "intact trials (read-only); or restore the store from a backup")

    def to_dataframe(self, searcher: str | None = None, seed: int | None = None) -> pd.DataFrame:
        """One row per trial: study, number, searcher, seed, state, reason, costs, scores, widths, bits, times."""
        rows = []
        for name, t in self._iter_trials(searcher, seed):
            ua = t.user_attrs
            rows.append({
                "study": name, "number": t.number, "searcher": ua.get("searcher"), "seed": ua.get("seed"),
                "state": ua.get("state", t.state.name.lower()), "reason": ua.get("reason", ""),
                "accuracy": ua.get("accuracy"), "loss": ua.get("loss"), "reward": ua.get("reward"),
                "macs": ua.get("macs"), "params": ua.get("params"), "bytes": ua.get("bytes"),
                "latency_ms": ua.get("latency_ms"), "feasible": ua.get("feasible"), "seconds": ua.get("seconds"),
                "key": ua.get("key"),
                "widths": ua.get("widths"), "bits": ua.get("bits"),
                "values": list(t.values) if t.values is not None else None,
                "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
            })
        columns = ["study", "number", "searcher", "seed", "state", "reason", "accuracy", "loss", "reward", "macs",
                   "params", "bytes", "latency_ms", "feasible", "seconds", "key", "widths", "bits", "values",
                   "datetime_start", "datetime_complete"]
        return pd.DataFrame(rows, columns=columns)

    # -- searcher state ------------------------------------------------------------------------------
    def save_state(self, searcher: str, seed: int, key: str, value: Any) -> None:
        """Store a JSON-friendly ``value`` of ``searcher``'s resumable state under ``key``."""
        study = optuna.load_study(study_name=self.study_name(searcher, seed), storage=self.storage)
        study.set_user_attr(_STATE_KEY + key, value)

    def load_state(self, searcher: str, seed: int, key: str, default: Any = None) -> Any:
        """The value saved by :meth:`save_state`, or ``default``."""
        name = self.study_name(searcher, seed)
        if name not in self.study_names():
            return default
        study = optuna.load_study(study_name=name, storage=self.storage)
        return study.user_attrs.get(_STATE_KEY + key, default)

    def artifact_dir(self, searcher: str, seed: int) -> Path:
        """A directory (created) for ``searcher``'s files for ``seed`` (checkpoints, replay buffers)."""
        path = self.artifact_root / searcher / f"seed{int(seed)}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AutoPruneError(f"cannot create the artifact directory {path} ({exc.strerror or exc})",
                                 hint="pass a writable artifact_root to TrialStore") from exc
        return path


# ---------------------------------------------------------------------------------------------------------
# Optuna internals: the only place that touches Optuna's private attributes (storage, study and trial ids)


def _storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def _trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def interrupt_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Finish a trial that another (stopped) process left RUNNING: ``state`` ``interrupted`` with ``reason``,
    Optuna state FAIL. Its candidate does not count and is proposed again.

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: If the trial finished in the meantime (a ``RuntimeError``).
    """
    storage, trial_id = _storage_of(study), _trial_id(trial)
    storage.set_trial_user_attr(trial_id, "state", "interrupted")
    storage.set_trial_user_attr(trial_id, "reason", reason)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)


def record_candidate_params(trial: optuna.Trial, candidate: Candidate, space: SearchSpace) -> int:
    """Store ``candidate``'s keep ratios (and bits) as the Optuna parameters of the running ``trial``.

    For searchers that propose without ``trial.suggest_*`` (baselines, RL agents, differentiable searchers):
    their trials then carry the same parameters as the Optuna searchers' — ``ratio:<group>`` (a float in
    ``[min_ratio, 1]``: the candidate's kept width / the group's size), ``w_bits:<layer>`` and ``a_bits:<layer>``
    (categorical over the layer's choices, only where it has more than one, as the Optuna searchers suggest
    them) — so that optuna-dashboard compares every searcher on the same axes. Nothing is proposed or sampled:
    the searchers' proposals do not change.

    Args:
        trial: A RUNNING trial of the searcher's study.
        candidate: The candidate it records.
        space: The search space (group sizes, ``min_ratio``, bit choices).

    Returns:
        The number of parameters written.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    storage, trial_id = _storage_of(trial.study), _trial_id(trial)
    written = 0

    def put(name: str, value: Any, dist: optuna.distributions.BaseDistribution) -> None:
        nonlocal written
        storage.set_trial_param(trial_id, name, dist.to_internal_repr(value), dist)
        written += 1

    lo = float(space.min_ratio)
    for g in space.groups:
        ratio = int(candidate.widths.get(g.group_id, g.size)) / g.size
        put(f"ratio:{g.group_id}", ratio, FloatDistribution(min(lo, ratio), 1.0))
    for lc in space.layers:
        spec = candidate.bits.get(lc.layer)
        if spec is None:
            continue
        for kind, choices, value in (("w_bits", lc.w_bits, spec.w_bits), ("a_bits", lc.a_bits, spec.a_bits)):
            if len(choices) > 1 and value in choices:
                put(f"{kind}:{lc.layer}", value, CategoricalDistribution(list(choices)))
    return written


def ask_with_attrs(study: optuna.Study, user_attrs: Mapping[str, Any]) -> optuna.Trial:
    """Like ``study.ask()``, but the new RUNNING trial is created with ``user_attrs`` already set, in one
    transaction: a process killed at any moment never leaves a running trial without them.

    Waiting (enqueued) trials are not taken; the campaign never enqueues any.
    """
    template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                           datetime_start=datetime.now(), datetime_complete=None, params={}, distributions={},
                           user_attrs=dict(user_attrs), system_attrs={}, intermediate_values={}, trial_id=-1)
    local = getattr(study, "_thread_local", None)
    if local is not None and hasattr(local, "cached_all_trials"):
        local.cached_all_trials = None  # as Study.ask does: the next read syncs with the storage
    trial_id = _storage_of(study).create_new_trial(study._study_id, template_trial=template)
    return optuna.Trial(study, trial_id)


def _set_constraints(study: optuna.Study, trial: optuna.Trial, named: Mapping[str, float]) -> None:
    """Hand constraint values to Optuna: ``Trial.set_constraint`` (Optuna ≥ 5), else the system attribute
    that ``constraints_func`` would have written (older Optuna; the samplers then get a ``constraints_func``)."""
    if hasattr(trial, "set_constraint"):
        for k, v in named.items():
            trial.set_constraint(k, v)
    else:
        _storage_of(study).set_trial_system_attr(_trial_id(trial), "constraints", list(named.values()))


def _record(t: FrozenTrial) -> TrialRecord:
    ua = t.user_attrs
    bits = ua.get("bits") or {}
    cand = Candidate.from_dict({"widths": ua.get("widths") or {}, "bits": bits})
    cost = CostReport(macs=int(ua.get("macs") or 0), params=int(ua.get("params") or 0),
                      bytes=int(ua.get("bytes") or 0), bitops=int(ua.get("bitops") or 0),
                      latency_ms=None if ua.get("latency_ms") is None else float(ua["latency_ms"]))
    result = None
    if ua.get("accuracy") is not None:
        result = EvalResult(accuracy=float(ua["accuracy"]), loss=float(ua.get("loss") or float("nan")),
                            seconds=float(ua.get("eval_seconds") or 0.0), evaluator=ua.get("evaluator") or "",
                            score=None if ua.get("score") is None else float(ua["score"]))
    return TrialRecord(number=t.number, candidate=cand, cost=cost, result=result, reward=ua.get("reward"),
                       searcher=ua.get("searcher", ""), seed=int(ua.get("seed", -1)),
                       state=ua.get("state", t.state.name.lower()), reason=ua.get("reason", ""))
