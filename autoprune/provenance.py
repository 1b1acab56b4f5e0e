"""A campaign directory: its files, its trial store, and the provenance written beside the results.

A campaign directory holds ``config.resolved.yaml`` (the validated config), ``command.txt`` (the command that
started the campaign; ``commands.log`` keeps every command run on it), ``environment.json`` (package versions,
git commit, host), ``space.json`` (groups, layers, dense cost and accuracy; written by
:func:`autoprune.campaign.open_campaign`) and, by default, the trial store ``trials.db``.

This module only reads and writes those files and opens the store; it builds no model and loads no data, so
readers of finished campaigns (:mod:`autoprune.report`, ``autoprune export``) depend on it alone.
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
from autoprune.errors import AutoPruneError, ConfigError
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


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the campaign directory and check that files can be written in it.

    Raises:
        AutoPruneError: If it cannot be created or written (names the directory and the reason).
    """
    out = Path(path).expanduser()
    hint = "set output_dir=<a writable directory> (or run from a directory where results/ can be written)"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutoPruneError(f"cannot create the output directory {out}: {exc.strerror or exc}", hint=hint) from None
    probe = out / f".autoprune-write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise AutoPruneError(f"the output directory {out} is not writable: {exc.strerror or exc}", hint=hint) from None
    return out


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


def check_identity(cfg: CampaignConfig) -> None:
    """Refuse a config whose problem (model, data, space, objective, evaluator) differs from the stored one.

    Trials scored on another problem would silently mix with this campaign's; ``n_trials``, ``time_limit``,
    the searcher, the seed, the storage and the export settings may change between runs.

    Raises:
        ConfigError: Naming the differing keys.
    """
    path = cfg.out_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the campaign's stored config {path}: {exc}",
                          hint="restore the file, or use a new campaign name") from None
    mine = json.loads(json.dumps(_identity(cfg.to_dict())))
    theirs = json.loads(json.dumps(_identity(stored), default=str))
    diff = []
    for key in IDENTITY_KEYS:
        a, b = theirs.get(key) or {}, mine.get(key) or {}
        for sub in sorted(set(a) | set(b)):
            if a.get(sub) != b.get(sub):
                diff.append(f"{key}.{sub}: {a.get(sub)!r} → {b.get(sub)!r}")
    if diff:
        raise ConfigError(f"campaign {cfg.name!r} in {cfg.out_dir} was run with another problem: "
                          + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""),
                          hint="keep those settings to resume, or start a new campaign (name=<new> or "
                          "output_dir=<dir>); the stored trials were left untouched")


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
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_provenance(cfg: CampaignConfig, argv: Sequence[str] | None, *, role: str = "search") -> None:
    """Write ``config.resolved.yaml``, ``command.txt``, ``environment.json`` and append to ``commands.log``.

    A ``worker`` only appends to the log (and writes the other files if the directory is new), so that the
    command that started the campaign stays in ``command.txt``.
    """
    out = cfg.out_dir
    line = command_line(argv)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(out / HISTORY_FILE, "a", encoding="utf-8") as fh:
        fh.write(f"{stamp}\t{role}\t{socket.gethostname()}:{os.getpid()}\tcwd={os.getcwd()}\t{line}\n")
    if role == "worker" and (out / CONFIG_FILE).is_file():
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
    if not d.is_dir():
        raise ConfigError(f"campaign directory {d} does not exist",
                          hint="pass the directory of a campaign, e.g. results/<campaign name>")
    if not path.is_file():
        raise ConfigError(f"{d} holds no campaign ({CONFIG_FILE} is missing)",
                          hint="run `autoprune search CONFIG` first, and pass its results/<name> directory")
    cfg = load_config(path, overrides)
    return dataclasses.replace(cfg, output_dir=str(d))
