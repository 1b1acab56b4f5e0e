"""The worker protocol: several processes (``autoprune search`` plus any number of ``autoprune worker``) on one study.

Each running trial carries its worker's host, process id and a heartbeat (:data:`WORKER_ATTR`,
:data:`HEARTBEAT_ATTR`), refreshed by a thread every ``workers.heartbeat_seconds``. A process counts the
finished trials *plus* the live running trials of the others towards ``n_trials``, and after asking for a trial
checks that fewer than ``n_trials`` trials precede it (by trial number) — so the study ends with exactly
``n_trials`` counted trials, none lost, none twice. Running trials whose process is gone (same host) or whose
heartbeat is older than ``workers.stale_seconds`` are marked ``interrupted`` and proposed again.

:class:`SharedStudy` implements this as the :class:`~autoprune.agents.base.StudySharing` hooks of a searcher's
run loop; with one process it proposes exactly what the plain searcher would. :func:`pid_alive` is the one
check whether a process of this host still runs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.agents.base import StudySharing
from autoprune.interrupts import deferred_sigint
from autoprune.store import COUNTED_STATES, ask_with_attrs, interrupt_trial

#: Trial user attributes written by campaign processes: the owner (:meth:`WorkerIdentity.to_dict`) and the
#: time of its last heartbeat (seconds since the epoch).
WORKER_ATTR = "autoprune.worker"
HEARTBEAT_ATTR = "autoprune.heartbeat"


@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a trial: host name, process id and a random id for this process."""

    host: str
    pid: int
    id: str

    @classmethod
    def current(cls) -> WorkerIdentity:
        """The identity of this process."""
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    def to_dict(self) -> dict[str, str | int]:
        """JSON form stored on the trial."""
        return {"host": self.host, "pid": self.pid, "id": self.id}


def pid_alive(pid: object) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie (``False`` for anything but a positive int)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def is_stale(trial: FrozenTrial, *, me: WorkerIdentity, stale_seconds: float, now: float | None = None) -> bool:
    """Whether a RUNNING trial has been abandoned by its process.

    It is when its worker is this host's process that no longer exists (or this very process, for a trial it
    is not running), or when its last heartbeat (its start, if it has none) is older than ``stale_seconds``.
    """
    now = time.time() if now is None else now
    w = trial.user_attrs.get(WORKER_ATTR)
    if isinstance(w, dict) and w.get("host") == me.host and (w.get("pid") == me.pid or not pid_alive(w.get("pid"))):
        return True
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if isinstance(beat, int | float):
        last = float(beat)
    elif trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()
    else:
        return False
    return now - last > stale_seconds


def fail_stale(study: optuna.Study, *, me: WorkerIdentity, stale_seconds: float) -> int:
    """Mark the abandoned RUNNING trials of ``study`` as ``interrupted``; return how many."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, me=me, stale_seconds=stale_seconds):
            continue
        try:
            interrupt_trial(study, t, "its process stopped (killed or crashed)")
        except (RuntimeError, ValueError):  # finished in the meantime by its owner
            continue
        n += 1
    return n


class Heartbeat:
    """Refreshes the heartbeat of the running trial every ``interval`` seconds (a daemon thread).

    Args:
        current: Returns the trial being evaluated, or ``None`` between trials.
        interval: Seconds between beats.
    """

    def __init__(self, current: Callable[[], optuna.Trial | None], interval: float) -> None:
        self.current = current
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autoprune-heartbeat", daemon=True)

    def start(self) -> None:
        """Start beating."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait (at most 5 s) for the thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            trial = self.current()
            if trial is None:
                continue
            with contextlib.suppress(Exception):  # the trial may have finished meanwhile
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())


class SharedStudy(StudySharing):
    """The hooks that make a searcher's run safe to share its study with other processes (module docstring).

    Args:
        worker: This process (default: :meth:`WorkerIdentity.current`).
        heartbeat_seconds: Seconds between heartbeats of the running trial.
        stale_seconds: A running trial whose heartbeat is older is abandoned.
    """

    def __init__(self, worker: WorkerIdentity | None = None, *, heartbeat_seconds: float = 10.0,
                 stale_seconds: float = 120.0) -> None:
        self.worker = worker if worker is not None else WorkerIdentity.current()
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.stale_seconds = float(stale_seconds)

    def open(self, study: optuna.Study) -> None:
        """Mark only abandoned running trials ``interrupted`` (:func:`fail_stale`): others may be live."""
        fail_stale(study, me=self.worker, stale_seconds=self.stale_seconds)

    def _occupied(self, study: optuna.Study, *, mine: int | None = None, before: int | None = None) -> int:
        """Counted trials plus live RUNNING trials other than ``mine`` (only trial numbers < ``before``)."""
        now = time.time()
        n = 0
        for t in study.get_trials(deepcopy=False):
            if before is not None and t.number >= before:
                continue
            if t.state.is_finished():
                n += t.user_attrs.get("state") in COUNTED_STATES
            elif t.state == TrialState.RUNNING and t.number != mine:
                n += not is_stale(t, me=self.worker, stale_seconds=self.stale_seconds, now=now)
        return n

    def occupied(self, study: optuna.Study, counted: int, running: optuna.Trial | None) -> int:
        """Counted trials of the study (read from it now) plus the trials other live workers are running."""
        return self._occupied(study, mine=None if running is None else running.number)

    def ask(self, study: optuna.Study) -> optuna.Trial:
        """A trial created already tagged with this worker and a heartbeat (one transaction), so a process killed
        at any moment never leaves a running trial without an owner."""
        return ask_with_attrs(study, {WORKER_ATTR: self.worker.to_dict(), HEARTBEAT_ATTR: time.time()})

    def admits(self, study: optuna.Study, trial: optuna.Trial, n_trials: int | None) -> bool:
        """False when ``n_trials`` counted or live trials precede ``trial`` (other workers took the last slots)."""
        return n_trials is None or self._occupied(study, before=trial.number) < n_trials

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Ctrl-C waits until the write is done (:func:`deferred_sigint`)."""
        return deferred_sigint()

    @contextlib.contextmanager
    def running(self, current: Callable[[], optuna.Trial | None]) -> Iterator[None]:
        """A :class:`Heartbeat` of the running trial for the duration of the loop."""
        beat = Heartbeat(current, self.heartbeat_seconds)
        beat.start()
        try:
            yield
        finally:
            beat.stop()
