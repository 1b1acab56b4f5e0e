"""Storage-fault part of the reliability soak: a disk that fills up and a file system that turns read-only while a
campaign writes its trials, or while ``autoprune export`` writes a model.

Cells (several rounds each; the fault comes at a random moment of a running command):

* ``disk|full-trial``: ``autoprune search`` writes its store on a small tmpfs; at a random moment the process is
  paused, the tmpfs is filled to the last byte, and the process resumes.
* ``disk|unwritable-trial``: the same on an ext4 image (loop device, ``errors=remount-ro``) that is switched to
  read-only under the running process (``/sys/fs/ext4/<dev>/trigger_fs_error``: the kernel's own emergency
  read-only mode, which also refuses writes to files that are already open; root ignores ``chmod`` and a tmpfs
  cannot be remounted read-only while a file on it is open for writing).
* ``disk|full-export`` / ``disk|unwritable-export``: ``autoprune export DIR --out <faulty fs>`` of a finished
  campaign, with the same faults.

Invariants checked per round: the command exits 0 (it finished before the fault bit) or 2 with ``error:`` and
``hint:`` and no traceback; every trial counted before the fault (read from a copy of the store taken while the
process was paused, after a ``sync``) is still counted afterwards; trial numbers are unique; the store passes
SQLite's ``integrity_check``; after the space is freed / the file system is repaired (``e2fsck``) and mounted
read-write again, the same command resumes to exactly ``n_trials`` counted trials. An export that failed leaves
either a model that loads completely (its weights match the checksum in ``arch.json``) or one that is refused with
a ``CheckpointError`` (clearly partial), never one that loads into something else or crashes the loader; the same
export command run again succeeds.

Where ``mount`` is not permitted (not root, no loop devices), the faults are injected instead: the command runs in
a wrapper that, on ``SIGUSR1``, makes the store's writes fail with SQLite's "database or disk is full" / "attempt
to write a readonly database" and file writes fail with ``ENOSPC``/``EROFS`` (``details["mechanism"]`` says which
was used). ``RELIABILITY_DISK_INJECT=1`` forces the injection.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._reliability import CellResult, Log

CELLS = ["disk|full-trial", "disk|full-export", "disk|unwritable-trial", "disk|unwritable-export"]
ROUNDS = (5, 1)
"""Rounds per cell: (full, quick)."""
N_TRIALS = 30
STUDY = "rel/random/seed0"
"""Study of :func:`tests.reliability.config_dict`'s campaign (name ``rel``, searcher ``random``, seed 0)."""
TMPFS_SIZE = "16m"
EXT4_MB = 32
COMMAND_TIMEOUT = 240.0

INJECT = r"""
import errno, os, signal, sqlite3, sys
import optuna
from sqlalchemy import exc as sa_exc
from autoprune import cli, utils

FAULT = os.environ["RELIABILITY_FAULT"]  # "full" or "readonly"
armed = {"on": False}
signal.signal(signal.SIGUSR1, lambda *_: armed.update(on=True))
MESSAGE = "database or disk is full" if FAULT == "full" else "attempt to write a readonly database"
ERRNO = errno.ENOSPC if FAULT == "full" else errno.EROFS

def store_write(real):
    def wrapped(*args, **kwargs):
        if armed["on"]:
            raise sa_exc.OperationalError("UPDATE", {}, sqlite3.OperationalError(MESSAGE))
        return real(*args, **kwargs)
    return wrapped

for name in ("set_trial_user_attr", "set_trial_state_values", "create_new_trial", "set_trial_param",
             "set_trial_intermediate_value", "set_trial_system_attr"):
    setattr(optuna.storages.RDBStorage, name, store_write(getattr(optuna.storages.RDBStorage, name)))
real_atomic_path = utils.atomic_path

def atomic_path(*args, **kwargs):
    if armed["on"]:
        raise OSError(ERRNO, os.strerror(ERRNO), str(args[0]) if args else "")
    return real_atomic_path(*args, **kwargs)

utils.atomic_path = atomic_path
sys.exit(cli.main(sys.argv[1:]))
"""
"""Fallback wrapper around ``autoprune.cli.main``: ``SIGUSR1`` arms the injected storage fault."""


# ---------------------------------------------------------------------------------------------------------------
# File systems
# ---------------------------------------------------------------------------------------------------------------


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=120)


def _umount(path: Path) -> None:
    if _sh("umount", str(path)).returncode != 0:
        _sh("umount", "-l", str(path))


class FaultyFs:
    """A directory whose storage can be broken under a running process, then repaired.

    ``kind`` is ``full`` (a tmpfs filled to the last byte) or ``readonly`` (an ext4 image switched to emergency
    read-only); ``mechanism`` says what was actually mounted, or ``inject`` where mounting is not possible.
    """

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.mnt = root / "mnt"
        self.image = root / "disk.img"
        self.filler = self.mnt / ".filler"
        self.mechanism = "inject"
        self.mounted = False

    def __enter__(self) -> FaultyFs:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if os.environ.get("RELIABILITY_DISK_INJECT") == "1" or os.geteuid() != 0:
            return self
        if self.kind == "full":
            ok = _sh("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(self.mnt)).returncode == 0
            self.mechanism = "tmpfs" if ok else "inject"
        else:
            ok = (_sh("truncate", "-s", f"{EXT4_MB}M", str(self.image)).returncode == 0
                  and _sh("mkfs.ext4", "-q", "-F", str(self.image)).returncode == 0 and self._mount_ext4())
            self.mechanism = "ext4-emergency-ro" if ok else "inject"
        self.mounted = ok
        return self

    def _mount_ext4(self) -> bool:
        return _sh("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mnt)).returncode == 0

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            _umount(self.mnt)
            self.mounted = False

    def fault(self, proc: subprocess.Popen[Any] | None) -> None:
        """Break the storage now (``proc``: the paused command, which gets ``SIGUSR1`` under injection)."""
        if self.mechanism == "inject":
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGUSR1)
            return
        if self.mechanism == "tmpfs":
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                for size in (1 << 20, 65536, 4096, 512, 1):  # to the last byte
                    with contextlib.suppress(OSError):
                        while True:
                            os.write(fd, b"\0" * size)
            finally:
                os.close(fd)
            return
        _sh("sync", "-f", str(self.mnt))
        device = _sh("findmnt", "-n", "-o", "SOURCE", str(self.mnt)).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("reliability benchmark\n")

    def repair(self) -> str:
        """Free the space / repair and remount read-write; return what was done."""
        if self.mechanism == "inject":
            return "nothing to repair (injected)"
        if self.mechanism == "tmpfs":
            self.filler.unlink(missing_ok=True)
            return "filler removed"
        _umount(self.mnt)
        self.mounted = False
        fsck = _sh("e2fsck", "-fy", str(self.image))
        if not self._mount_ext4():
            raise RuntimeError(f"cannot remount {self.image} after e2fsck (exit {fsck.returncode})")
        self.mounted = True
        return f"e2fsck exit {fsck.returncode}, remounted read-write"

    def command(self, args: list[str]) -> list[str]:
        """The process command line of ``autoprune -q ARGS`` (through the injection wrapper if injecting)."""
        if self.mechanism == "inject":
            return [sys.executable, "-c", INJECT, "-q", *args]
        return [sys.executable, "-m", "autoprune.cli", "-q", *args]

    def env(self) -> dict[str, str]:
        from tests.reliability import cli_env

        return {**cli_env(), "RELIABILITY_FAULT": self.kind, "MPLBACKEND": "Agg"}


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _read_store(db: Path, into: Path, study: str = STUDY) -> tuple[dict[int, str], list[int]]:
    """Read a *copy* of the store (so that no connection of this process keeps the faulty file system busy).

    Returns:
        Trial number → candidate key of the counted trials of ``study``, and every trial number (duplicates
        included); both empty when there is no store or study yet.
    """
    import optuna

    from autoprune.store import COUNTED_STATES

    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    for suffix in ("", "-wal", "-shm"):
        src = db.parent / (db.name + suffix)
        if src.exists():
            shutil.copy2(src, into / src.name)
    if not (into / db.name).exists():
        return {}, []
    storage = optuna.storages.RDBStorage(f"sqlite:///{into / db.name}")
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the study was not created yet
        return {}, []
    finally:
        storage.engine.dispose()
    counted = {t.number: str(t.user_attrs.get("key")) for t in trials
               if t.state.is_finished() and t.user_attrs.get("state") in COUNTED_STATES}
    return counted, [t.number for t in trials]


def _wait(proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str]:
    """The exit code and stderr of ``proc`` (``None`` if it had to be killed after ``timeout``)."""
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err


def _judge_exit(res: CellResult, where: str, code: int | None, err: str, info: dict[str, Any] | None = None) -> str:
    """Check one exit (0, or 2 with ``error:``+``hint:`` and no traceback); return its label (and keep the end of
    an unexpected stderr in ``info["stderr"]``)."""
    if info is not None and (code not in (0, 2) or "Traceback" in err):
        info["stderr"] = err[-2500:]
    if code is None:
        res.unhandled_exceptions += 1
        res.fail(f"{where}: no exit within {COMMAND_TIMEOUT:.0f} s (killed)")
        return "hang"
    if "Traceback" in err:
        res.unhandled_exceptions += 1
        last = err.strip().splitlines()[-1][:200]
        res.fail(f"{where}: traceback (exit {code}): {last}")
        return f"exit {code} traceback"
    if code == 0:
        return "exit 0"
    if code == 2 and "error:" in err and "hint:" in err:
        return "exit 2"
    res.unhandled_exceptions += 1
    res.fail(f"{where}: exit {code} without error:+hint: {err.strip()[-200:]!r}")
    return f"exit {code}"


def _first_error(err: str) -> str:
    return next((ln.strip()[:160] for ln in err.splitlines() if ln.startswith("error:")), "")


@contextlib.contextmanager
def _running(fs: FaultyFs, args: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """``autoprune -q ARGS`` running in ``cwd``; killed (and continued, if paused) on the way out."""
    proc = subprocess.Popen(fs.command(args), cwd=cwd, env=fs.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)


def _wait_for_trials(proc: subprocess.Popen[str], db: Path, target: int | None, timeout: float = 120.0) -> bool:
    """Wait until the store holds more than ``target`` finished trials (``None``: do not wait) unless ``proc`` ends
    first; whether it is still running. Each look is a short read-only connection, closed at once."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while target is not None and time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            with contextlib.suppress(sqlite3.Error):
                con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
                try:
                    if con.execute("SELECT count(*) FROM trials WHERE state != 'RUNNING'").fetchone()[0] > target:
                        break
                finally:
                    con.close()
        time.sleep(0.03)
    return proc.poll() is None


def _sleep_until(proc: subprocess.Popen[str], seconds: float) -> bool:
    """Sleep ``seconds`` unless ``proc`` ends first; whether it is still running."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return proc.poll() is None


# ---------------------------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------------------------


def _trial_round(kind: str, root: Path, rng: random.Random, res: CellResult, n_trials: int) -> dict[str, Any]:
    """One search hit by the fault at a random moment, then checked and resumed."""
    from tests.reliability import run_cli, sqlite_integrity, write_config

    info: dict[str, Any] = {}
    with FaultyFs(kind, root) as fs:
        info["mechanism"] = fs.mechanism
        out = fs.mnt / "out"
        db = out / "trials.db"
        config = write_config(root / "c.yaml", out, n_trials=n_trials)
        # a fifth of the faults during the start-up (the store is created at ~2.5 s), the others after k trials
        target = None if rng.random() < 0.2 else rng.randrange(n_trials)
        delay = rng.uniform(0.3, 3.0) if target is None else rng.uniform(0.0, 0.15)
        info["fault_at"] = f"{delay:.2f} s after the start" if target is None else f"{delay:.2f} s after trial {target}"
        with _running(fs, ["search", str(config)], root) as proc:
            if _wait_for_trials(proc, db, target) and _sleep_until(proc, delay):
                os.kill(proc.pid, signal.SIGSTOP)
                before, _ = _read_store(db, root / "snapshot")
                fs.fault(proc)
                os.kill(proc.pid, signal.SIGCONT)
                info["phase"] = "during the search"
                code, err = _wait(proc, COMMAND_TIMEOUT)
            else:  # it finished first: the same command (nothing left to do) meets the fault
                info["phase"] = "after the search (rerun under the fault)"
                _wait(proc, COMMAND_TIMEOUT)
                before, _ = _read_store(db, root / "snapshot")
                fs.fault(None)
                code, err = _rerun_under_fault(fs, ["search", str(config)], root)
        where = f"{kind} {root.name} ({info['phase']}, fault {info['fault_at']})"
        info["exit"] = _judge_exit(res, where, code, err, info)
        info["error"] = _first_error(err)
        info["counted_before_fault"] = len(before)
        info["repair"] = fs.repair()
        _check_store(res, where, db, before, info, root)
        code, _, err = run_cli("search", str(config), cwd=root, timeout=COMMAND_TIMEOUT)
        info["resume_exit"] = code
        if code != 0:
            res.unhandled_exceptions += int("Traceback" in err)
            res.fail(f"{where}: the resumed search exited {code}: {_first_error(err) or err.strip()[-200:]!r}")
        after, numbers = _read_store(db, root / "after-resume")
        info["counted_after_resume"] = len(after)
        lost = [n for n, key in before.items() if after.get(n) != key]
        dup = len(numbers) - len(set(numbers)) + max(0, len(after) - n_trials)
        if lost and not info.get("lost_counted"):
            res.lost_trials += len(lost)
            res.fail(f"{where}: trials counted before the fault are gone after the resume: {lost}")
        res.duplicate_trials += dup
        if len(after) < n_trials and code == 0:
            res.fail(f"{where}: the resumed search stopped at {len(after)} of {n_trials} counted trials")
        if dup:
            res.fail(f"{where}: {dup} duplicate trial(s) after the resume (numbers {sorted(numbers)})")
        if sqlite_integrity(db) != "ok":
            res.fail(f"{where}: integrity_check failed after the resume")
    return info


def _rerun_under_fault(fs: FaultyFs, args: list[str], cwd: Path) -> tuple[int | None, str]:
    """Run ``args`` again while the storage is broken (injection: armed once the process has started)."""
    with _running(fs, args, cwd) as proc:
        if fs.mechanism == "inject":
            time.sleep(0.5)
            fs.fault(proc)
        return _wait(proc, COMMAND_TIMEOUT)


def _check_store(res: CellResult, where: str, db: Path, before: dict[int, str], info: dict[str, Any],
                 scratch: Path) -> None:
    """After the fault and the repair: integrity, nothing counted before the fault lost, unique numbers
    (``scratch``: where the copy of the store is read)."""
    from tests.reliability import sqlite_integrity

    if not db.exists():
        if before:
            res.lost_trials += len(before)
            res.fail(f"{where}: the store disappeared with {len(before)} counted trials")
        info["integrity"] = "no store (the fault came before it was created)"
        return
    integrity = sqlite_integrity(db)
    info["integrity"] = integrity
    if integrity != "ok":
        res.fail(f"{where}: integrity_check after the fault: {integrity[:160]}")
    now, numbers = _read_store(db, scratch / "after-fault")
    info["counted_after_fault"] = len(now)
    lost = [n for n, key in before.items() if now.get(n) != key]
    if lost:
        res.lost_trials += len(lost)
        info["lost_counted"] = True
        res.fail(f"{where}: trials counted before the fault are gone or changed: {lost}")
    if len(numbers) != len(set(numbers)):
        res.duplicate_trials += len(numbers) - len(set(numbers))
        res.fail(f"{where}: duplicate trial numbers after the fault: {sorted(numbers)}")


def _model_state(model: Path) -> str:
    """``complete`` (loads and runs), ``none`` (no file), ``partial (refused: ...)``; anything else is a problem
    (returned as ``LOADER <exception>``)."""
    import torch

    from autoprune.errors import AutoPruneError
    from autoprune.serialize import load_module

    if not model.exists() or not any(model.iterdir()):
        return "none"
    try:
        gm = load_module(model)
        shape = [int(s) for s in gm.meta["autoprune"]["example_input"]["shape"]]
        with torch.no_grad():
            gm(torch.rand(*shape))
        return "complete"
    except AutoPruneError as exc:
        return f"partial (refused: {exc.message.splitlines()[0][:80]})"
    except Exception as exc:
        return f"LOADER {type(exc).__name__}: {str(exc)[:120]}"


def _export_round(kind: str, root: Path, camp: Path, rng: random.Random, res: CellResult) -> dict[str, Any]:
    """One export hit by the fault at a random moment; the model left behind is checked; the export rerun."""
    info: dict[str, Any] = {}
    with FaultyFs(kind, root) as fs:
        info["mechanism"] = fs.mechanism
        exp = fs.mnt / "exp"
        args = ["export", str(camp), "--trial", "best", "--epochs", "0.05", "--formats", "none", "--no-latency",
                "--out", str(exp)]
        delay = rng.uniform(0.3, 7.0)
        info["fault_after_s"] = round(delay, 2)
        with _running(fs, args, root) as proc:
            if _sleep_until(proc, delay):
                os.kill(proc.pid, signal.SIGSTOP)
                fs.fault(proc)
                os.kill(proc.pid, signal.SIGCONT)
                info["phase"] = "during the export"
                code, err = _wait(proc, COMMAND_TIMEOUT)
            else:
                info["phase"] = "after the export (rerun under the fault)"
                first, first_err = _wait(proc, COMMAND_TIMEOUT)
                _judge_exit(res, f"{kind} {root.name} (before the fault)", first, first_err)
                fs.fault(None)
                code, err = _rerun_under_fault(fs, args, root)
        where = f"{kind} {root.name} ({info['phase']}, fault after {delay:.1f} s)"
        info["exit"] = _judge_exit(res, where, code, err, info)
        info["error"] = _first_error(err)
        state = _model_state(exp / "model")
        info["model_after_fault"] = state
        if state.startswith("LOADER"):
            res.unhandled_exceptions += 1
            res.fail(f"{where}: the model left by the export crashes the loader: {state}")
        elif code == 0 and state != "complete":
            res.fail(f"{where}: the export exited 0 but its model is {state}")
        info["repair"] = fs.repair()
        info["model_after_repair"] = _model_state(exp / "model")
        from tests.reliability import run_cli

        code, _, err = run_cli(*args, cwd=root, timeout=COMMAND_TIMEOUT)
        info["rerun_exit"] = code
        final = _model_state(exp / "model")
        info["model_after_rerun"] = final
        if code != 0 or final != "complete":
            res.unhandled_exceptions += int("Traceback" in err)
            res.fail(f"{where}: the export rerun after the repair exited {code}, model {final}: "
                     f"{_first_error(err) or err.strip()[-200:]!r}")
    return info


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def run_cell(name: str, work: Path, seed: int, log: Log, quick: bool = False) -> CellResult:
    """Run one storage-fault cell (see the module docstring) in the scratch directory ``work``.

    Args:
        name: One of :data:`CELLS`.
        work: Empty scratch directory the cell owns (its mounts live below it and are removed at the end).
        seed: Seed of the fault moments.
        log: Progress-line printer.
        quick: One round (with 6 trials) instead of five (with 30).

    Returns:
        The cell's :class:`CellResult`: lost/duplicate trials and unhandled exits; ``details`` hold the mechanism
        and one record per round (phase, exit, counted trials before the fault / after it / after the resume,
        the model state after a failed export).
    """
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; cells: {CELLS}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{name}/{seed}")
    res = CellResult()
    kind = "full" if "full" in name else "readonly"
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    camp: Path | None = None
    if name.endswith("export"):
        from tests.reliability import run_cli, write_config

        config = write_config(work / "camp.yaml", work / "camp", n_trials=3, evaluator={"name": "plain"})
        code, _, err = run_cli("search", str(config), cwd=work, timeout=COMMAND_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"setup search failed (exit {code}): {err[-500:]}")
        camp = work / "camp"
    for r in range(ROUNDS[1] if quick else ROUNDS[0]):
        root = work / f"round{r}"
        root.mkdir()
        t0 = time.monotonic()
        try:
            if camp is not None:
                info = _export_round(kind, root, camp, rng, res)
            else:
                info = _trial_round(kind, root, rng, res, 6 if quick else N_TRIALS)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            info = {"harness_error": f"{type(exc).__name__}: {exc}",
                    "where": traceback.format_exc(limit=-3)[-1500:]}
            res.fail(f"{name} round {r}: the benchmark itself failed: {type(exc).__name__}: {str(exc)[:200]}")
        info["seconds"] = round(time.monotonic() - t0, 1)
        rounds.append(info)
        log(f"{name} round {r}: {info.get('phase')}, {info.get('exit')}"
            + (f" ({info['error']})" if info.get("error") else "")
            + (f", model {info.get('model_after_fault')}" if camp is not None else
               f", counted {info.get('counted_before_fault')} → {info.get('counted_after_fault')} → "
               f"{info.get('counted_after_resume')}") + f", {info['seconds']} s")
    mechanisms = Counter(str(r.get("mechanism")) for r in rounds)
    res.details = {"mechanism": ", ".join(mechanisms), "rounds": rounds,
                   "exits": dict(Counter(str(r.get("exit")) for r in rounds)),
                   "seconds": round(time.monotonic() - started, 1)}
    if any(r.get("mechanism") == "inject" for r in rounds) and os.environ.get("RELIABILITY_DISK_INJECT") != "1":
        log(f"{name}: mount not permitted here, faults injected in-process instead")
    return res
