"""A campaign directory: its files, its trial store, and the provenance written beside the results.

A campaign directory holds ``config.resolved.yaml`` (the validated config), ``command.txt`` (the command that
started the campaign; ``commands.log`` keeps every command run on it), ``environment.json`` (package versions,
git commit, host), ``space.json`` (groups, layers, dense cost and accuracy; written by
:func:`autoprune.campaign.open_campaign`) and, by default, the trial store ``trials.db``.

The problem a directory holds (model, data, search space, objective, evaluator) is fixed by its first trial
(:func:`check_identity`): until then a new config replaces the stored one.

This module only reads and writes those files and opens the store; it builds no model, loads no data and does
not import torch at module level, so readers of finished campaigns (:mod:`autoprune.report`, ``autoprune
export``) depend on it alone and the commands can check a campaign directory before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import yaml

from autoprune.config import CampaignConfig, load_config
from autoprune.errors import ConfigError
from autoprune.store import TrialStore

CONFIG_FILE = "config.resolved.yaml"
COMMAND_FILE = "command.txt"
HISTORY_FILE = "commands.log"
ENVIRONMENT_FILE = "environment.json"
SPACE_FILE = "space.json"
STORE_FILE = "trials.db"
#: Config sections that define the problem: a campaign directory refuses a config that changes them.
IDENTITY_KEYS = ("model", "dataset", "search_space", "objective", "evaluator")
_PACKAGES = ("autoprune", "torch", "numpy", "optuna", "sqlalchemy", "pandas", "matplotlib", "scikit-learn",
             "stable-baselines3", "gymnasium", "pyyaml", "psycopg2-binary")


def storage_location(cfg: CampaignConfig) -> str:
    """The trial store of ``cfg``: its ``storage`` URL/path, else ``<out_dir>/trials.db``."""
    return cfg.storage or str(cfg.out_dir / STORE_FILE)


def open_store(cfg: CampaignConfig) -> TrialStore:
    """Open (creating if needed) the campaign's trial store; RL artifacts go to ``<out_dir>/artifacts``.

    Processes opening a new store at the same moment are serialised by the store itself.

    Raises:
        AutoPruneError: Unwritable location, missing database driver, a server that cannot be reached, or a
            database locked by another program for longer than ``storage_timeout`` seconds.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return TrialStore(storage_location(cfg), campaign=cfg.name, artifact_root=cfg.out_dir / "artifacts",
                      timeout=cfg.storage_timeout)


def _identity(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: data.get(k) for k in IDENTITY_KEYS}


def identity_changes(cfg: CampaignConfig) -> list[str]:
    """How the problem of ``cfg`` differs from the one stored in its campaign directory.

    Returns:
        ``"key.sub: old → new"`` per differing setting of :data:`IDENTITY_KEYS`; empty when the directory holds
        no ``config.resolved.yaml`` or the same problem; one entry naming the file when it cannot be read.
    """
    path = cfg.out_dir / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(stored, Mapping):
            raise ValueError(f"a {type(stored).__name__}, not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        return [f"{CONFIG_FILE}: unreadable ({exc})"]
    mine = json.loads(json.dumps(_identity(cfg.to_dict())))
    theirs = json.loads(json.dumps(_identity(stored), default=str))
    diff = []
    for key in IDENTITY_KEYS:
        a, b = theirs.get(key) or {}, mine.get(key) or {}
        if not isinstance(a, Mapping):
            a = {"": a}
        for sub in sorted(set(a) | set(b)):
            if a.get(sub) != b.get(sub):
                diff.append(f"{key}.{sub}: {a.get(sub)!r} → {b.get(sub)!r}")
    return diff


def stored_trials(store: TrialStore) -> int:
    """How many trials the campaign's studies hold, in any state (running and interrupted ones included).

    Every trial is read and checked (:meth:`~autoprune.store.TrialStore.check_readable`): a store changed by
    another program is refused here, before a command builds on it.
    """
    return store.check_readable()


def check_identity(cfg: CampaignConfig, store: TrialStore | None = None) -> list[str]:
    """Refuse a config whose problem (model, data, space, objective, evaluator) differs from the stored one,
    once the campaign has computed something.

    Trials scored on another problem would silently mix with this campaign's; ``n_trials``, ``time_limit``,
    the searcher, the seed, the storage and the export settings may change between runs. The problem is fixed
    by the first trial: a directory whose store holds no trial at all (a run that failed before its first
    trial, e.g. on a typo) accepts a new problem — nothing computed, nothing to protect. The caller then
    calls :func:`release_identity` and rewrites the provenance (:func:`write_provenance` with
    ``new_identity=True``).

    Args:
        cfg: The config about to be run.
        store: The campaign's trial store; ``None`` refuses any change (the trials are not looked at).

    Returns:
        The differences that were accepted (empty when the problem is unchanged or the directory is new).

    Raises:
        ConfigError: Naming the differing keys, when the store holds at least one trial (or ``store`` is
            ``None``).
    """
    diff = identity_changes(cfg)
    if not diff:
        return []
    if store is not None and stored_trials(store) == 0:
        return diff
    if diff[0].startswith(f"{CONFIG_FILE}: "):
        raise ConfigError(f"cannot read the campaign's stored config {cfg.out_dir / CONFIG_FILE}: "
                          f"{diff[0].removeprefix(CONFIG_FILE + ': ')}",
                          hint="restore the file, or use a new campaign name; the stored trials were left untouched")
    raise ConfigError(f"campaign {cfg.name!r} in {cfg.out_dir} was run with another problem: "
                      + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""),
                      hint="keep those settings to resume, or start a new campaign (name=<new> or "
                      "output_dir=<dir>); the stored trials were left untouched")


def release_identity(cfg: CampaignConfig) -> None:
    """Forget the problem of a campaign directory whose store holds no trial (see :func:`check_identity`).

    Removes ``space.json`` (the dense model's cost and accuracy of the old problem); the provenance files
    are rewritten by :func:`write_provenance`.
    """
    (cfg.out_dir / SPACE_FILE).unlink(missing_ok=True)


def git_commit(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package), or ``None``."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "--no-optional-locks", "-C", str(where), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def environment_info() -> dict[str, Any]:
    """Python, platform, package versions, git commit, host and time (written to ``environment.json``)."""
    import torch

    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "packages": versions,
        "git": git_commit(),
        "host": socket.gethostname(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def command_line(argv: Sequence[str] | None) -> str:
    """The exact command as a shell line (``autoprune`` + ``argv``; the process's own argv if ``None``)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return shlex.join(["autoprune", *args])


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file;
    :func:`autoprune.utils.atomic_write`)."""
    from autoprune.utils import atomic_write  # imports torch: not at module level, so that reading a campaign
    # directory (report, the checks of export) stays free of it

    atomic_write(path, text)


def write_provenance(cfg: CampaignConfig, argv: Sequence[str] | None, *, role: str = "search",
                     new_identity: bool = False) -> None:
    """Write ``config.resolved.yaml``, ``command.txt``, ``environment.json`` and append to ``commands.log``.

    A ``worker`` only appends to the log (and writes the other files if the directory is new, or holds no
    trial and gets a new problem: ``new_identity``), so that the command that started the campaign stays in
    ``command.txt``.
    """
    out = cfg.out_dir
    line = command_line(argv)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(out / HISTORY_FILE, "a", encoding="utf-8") as fh:
        fh.write(f"{stamp}\t{role}\t{socket.gethostname()}:{os.getpid()}\tcwd={os.getcwd()}\t{line}\n")
    if role == "worker" and (out / CONFIG_FILE).is_file() and not new_identity:
        return
    write_atomic(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_atomic(out / COMMAND_FILE, f"# run from {os.getcwd()}\n{line}\n")
    write_atomic(out / ENVIRONMENT_FILE, json.dumps(environment_info(), indent=2) + "\n")


def load_resolved(campaign_dir: str | os.PathLike[str], overrides: Sequence[str] = ()) -> CampaignConfig:
    """The config a campaign directory was run with (``config.resolved.yaml``), with ``overrides`` applied.

    ``output_dir`` is pointed at ``campaign_dir`` so that a moved directory still finds its files.

    Raises:
        ConfigError: If the directory holds no campaign.
    """
    d = Path(campaign_dir)
    path = d / CONFIG_FILE
    try:
        d.is_dir()
    except OSError as exc:  # a name too long for the file system, a path through a file, ...
        raise ConfigError(f"campaign directory {str(d)[:200]} cannot be read: {exc.strerror or exc}",
                          hint="pass the directory of a campaign, e.g. results/<campaign name>") from None
    if not d.is_dir():
        raise ConfigError(f"campaign directory {d} does not exist",
                          hint="pass the directory of a campaign, e.g. results/<campaign name>")
    if not path.is_file():
        raise ConfigError(f"{d} holds no campaign ({CONFIG_FILE} is missing)",
                          hint="run `autoprune search CONFIG` first, and pass its results/<name> directory")
    cfg = load_config(path, overrides)
    return dataclasses.replace(cfg, output_dir=str(d))
