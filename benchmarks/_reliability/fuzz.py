"""Hostile-input part of the reliability soak: fuzzed campaign configs, CLI argument lists and damaged files.

Cells:

* ``fuzz|config``: campaign documents. Arbitrary YAML-able documents and single-key mutations of a working campaign
  (drawn with the ``values`` strategy, ``PATHS`` and ``mutate`` of ``tests/reliability/test_hostile_input.py``,
  deterministically from the seed), values of the right type at their edges (:data:`EDGES`: zero, negative, tiny,
  huge, every registered name), and text-level mutations of the YAML file (wrong types, NaN/huge numbers, unknown
  and duplicated keys, unicode and invalid UTF-8, tags, anchors, merge keys, billion-laughs bombs, deep nesting,
  truncation, several documents). Each one goes through ``config_from_dict``/``load_config`` and, when accepted, the
  campaign build (model, data, graph, space, evaluator, searcher; no training).
* ``fuzz|cli``: random argument lists made from the real subcommands and their options (wrong values, missing and
  odd paths, dotted ``KEY=VALUE`` overrides, unknown options, global options, unicode, 5,000-character strings),
  run through ``autoprune.cli.main``.
* ``fuzz|files``: mutations of real artifacts written by ``autoprune train``/``search``/``export`` (an exported
  model's ``arch.json``/``weights.pt``, a quantized export, a training checkpoint, a campaign's ``trials.db`` and
  ``config.resolved.yaml``): bit flips, truncations, appended junk, JSON fields of the wrong type, tensors of the
  wrong shape or dtype re-sealed with a matching checksum, SQL edits of the store. They are loaded with the public
  loaders (``load_module``, ``read_checkpoint``/``checkpoint_metadata``) or handed to ``autoprune evaluate``,
  ``report``, ``export`` and ``search``.

"In-process" inputs run in a harness interpreter (one per batch, restarted after a crash or a hang, memory
capped at 6 GiB) that calls the Python API or ``cli.main`` once per input; one input in ten instead runs the real
command line ``python -m autoprune.cli ...`` in its own process. The only acceptable outcomes are success, an
``AutoPruneError`` (``ConfigError``, ``CheckpointError``, ``DataError``) or, from the command line, exit 0 or exit 2
with ``error:`` and ``hint:`` (argparse's usage errors: ``usage:``), never a ``Traceback``. ``quickstart`` and
``export`` may also exit 1 with their documented ``check FAILED`` line. Anything else (another exception, another
exit code, a traceback on stderr, a crash, a hang) counts in ``unhandled_exceptions`` with a shortened reproducer.
A user error without its ``hint:`` is listed (``details["missing_hint"]``, one failure line per distinct message)
but not counted as unhandled.

Run as ``python -m benchmarks._reliability.fuzz JOBS START FD``, this module is the harness itself.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import random
import re
import resource
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks._reliability import CellResult, Log

REPO = Path(__file__).resolve().parents[2]
CELLS = ["fuzz|config", "fuzz|cli", "fuzz|files"]
SUBPROCESS_EVERY = 10
"""One input in this many runs as a real ``python -m autoprune.cli`` process instead of in the harness."""
MEMORY_LIMIT = 6 * 2**30
"""Address-space cap of the harness and of the command-line processes (a hostile file must not eat the machine)."""
JOB_TIMEOUT = 120.0
"""Seconds one input may take (a config build takes ~0.2 s; the slowest valid commands ~15 s)."""
STARTUP_TIMEOUT = 60.0
"""Extra seconds for a fresh harness to import torch and autoprune."""
SIZES: dict[str, tuple[int, int]] = {"fuzz|config": (700, 30), "fuzz|cli": (350, 30), "fuzz|files": (260, 30)}
"""Inputs per cell: (full, quick)."""

Job = tuple[str, Any]
"""``(kind, payload)`` handed to the harness (see :func:`_run_job`)."""


class Item(NamedTuple):
    """One fuzzed input: run in the harness (``argv is None``) or as a process (``argv``; a first entry
    :data:`PYTHON` runs ``python`` with :data:`LOAD_MODULE` instead of the CLI) in ``cwd``."""

    family: str
    job: Job
    argv: list[str] | None
    reproducer: Any
    cwd: Path | None = None


PYTHON = "__python__"
LOAD_MODULE = """import sys
from autoprune.errors import AutoPruneError
from autoprune.serialize import load_module
try:
    load_module(sys.argv[1])
except AutoPruneError as exc:
    print("error:", exc.message, file=sys.stderr)
    print("  hint:", exc.hint, file=sys.stderr)
    sys.exit(2)
"""
"""The process-level share of the exported-model inputs (the CLI has no command that only loads a model)."""


# ---------------------------------------------------------------------------------------------------------------
# Hostile values shared by the generators
# ---------------------------------------------------------------------------------------------------------------

OVERRIDES = [
    "n_trials=-3", "n_trials=abc", "n_trials=1e9", "n_trials=", "n_trials=[1]", "seed=18446744073709551616",
    "seed=-1", "objective.budget.macs=abc", "objective.budget.macs=-1", "objective.budget.macs=.nan",
    "objective.budget.macs=1e300", "objective.budget.macs=0", "objective.budget.params=0", "objective.budget.x=1",
    "model.kwargs.width=0", "model.kwargs.width=abc", "model.kwargs=[1, 2]", "model.kwargs.nope=1",
    "dataset.batch_size=0", "dataset.batch_size=-1", "dataset.val_size=1.5", "dataset.val_size=-3",
    "dataset.val_size=0", "dataset.eval_batch_size=.inf", "search_space.min_ratio=2", "search_space.min_ratio=0",
    "search_space.w_bits=[0]", "search_space.w_bits=[99]", "search_space.w_bits=[]", "search_space.exclude=['.*']",
    "search_space.round_to=0", "search_space.round_to=-8", "search_space.family=vgg", "search_space.prune=false",
    "search_space.quantize=yes", "search_space.importance=taylor", "searcher.name=nope", "searcher.name=",
    "searcher.kwargs.nope=1", "searcher.kwargs={n_startup_trials: -1}", "searcher.agent_kwargs={tpe: 3}",
    "evaluator.name=plain", "evaluator.kwargs.batches=-1", "evaluator.kwargs.batches=abc", "evaluator.name=infcop",
    "objective.reward=r_flops", "objective.reward=nope", "objective.objectives=[]", "objective.objectives=[macs]",
    "objective.kwargs={lam: .nan}", "time_limit=-1", "time_limit=0", "time_limit_per_trial=0",
    "time_limit_per_trial=1e-9", "storage_timeout=-5", "workers.heartbeat_seconds=0", "workers.stale_seconds=-1",
    "export.formats=[exe]", "export.epochs=.inf", "export.finetune=maybe", "=1", "a..b=1", ".=1", "name=",
    "name=a/../b", "name=ü", "nokey", "x" * 3000 + "=1", "model.name=os:getcwd", "model.name=torchvision:nope",
    "model.name=json:nope", "dataset.name=image_folder", "dataset.data_dir=/nonexistent/data",
    "model.checkpoint=/dev/null", "model.checkpoint=/nonexistent.pt", "plugins=[nope_zz_plugin]", "plugins=3",
    "device=cuda:7", "device=tpu", "device=meta", "dataset.kwargs={image_size: -1}", "model={}", "dataset=3",
    "searcher=[]", "objective=null", "workers=abc", "export=1", "n_trials=0x10", "seed=1_000",
    "objective.budget={macs: 0.5, params: abc}", "search_space.a_bits=[4, null, abc]", "search_space.exclude=3",
    "n_trials=!!python/object/apply:os.system [id]", "n_trials=*a", "n_trials=&a 3", "model.kwargs.width=!!binary eA==",
]
"""Dotted ``KEY=VALUE`` overrides: wrong types, bad numbers, bad names, malformed keys."""

EDGES: list[tuple[tuple[str, ...], list[Any]]] = [
    (("n_trials",), [0, 1, -1, 2**53, 2**53 + 1]), (("seed",), [-1, 2**32, 2**53, 0]),
    (("time_limit",), [0, -1.0, 1e-9]), (("time_limit_per_trial",), [0, -1, 1e-9]),
    (("storage_timeout",), [0, -1, 1e-9]), (("model", "kwargs", "width"), [1, 0, -1, 2**20, 3.5, True]),
    (("dataset", "batch_size"), [1, 0, -1, 2**31, 2**53]), (("dataset", "eval_batch_size"), [1, 0, 2**40]),
    (("dataset", "val_size"), [0, 0.0, 1, 0.999999, 1.0, 1e6, -0.5, 2**40, 1e-9]), (("dataset", "seed"), [-1, 2**40]),
    (("dataset", "kwargs"), [{"image_size": 8}, {"x": 1}]),
    (("search_space", "min_ratio"), [0.0, 1e-9, 1.0, 0.999, -0.1, 1.5]),
    (("search_space", "round_to"), [1, 0, -1, 3, 2**20]),
    (("search_space", "w_bits"), [[1], [32], [64], [], [8, 8], [0], [-4], [2**40]]),
    (("search_space", "a_bits"), [[None, 1], [32], [], [0], [None, 8]]),
    (("search_space", "first_last_min_bits"), [0, 1, 99, -1]),
    (("search_space", "exclude"), [["("], ["["], [".*"], ["*"], ["conv"], [""], ["(?P<x"], ["a{99999999999}"]]),
    (("search_space", "quantize"), [True]), (("search_space", "prune"), [False]),
    (("search_space", "family"), ["generic", "vgg", "cifar_resnet", "mobilenetv2"]),
    (("search_space", "importance"), ["taylor", "bn_scale", "fpgm", "random", "prefix", "consumer_l1", "l1"]),
    (("objective", "budget", "macs"), [1e-9, 1.0, 1.0000001, 2, 10**12, 0.01]),
    (("objective", "budget", "params"), [1e-9, 1.0, 2, 10**12]), (("objective", "budget", "bytes"), [0.5, 1e-9]),
    (("objective", "reward"), ["accuracy", "constrained_accuracy", "haq", "latency_aware", "r_flops", "r_param",
                               "size_aware", "weighted"]),
    (("objective", "kwargs"), [{"lam": -1}, {"lam": 1e300}, {"scale": 0}, {"acc_ref": 2}]),
    (("objective", "objectives"), [["accuracy"], ["accuracy", "macs", "params"], ["accuracy", "accuracy"],
                                   ["macs", "accuracy"], ["latency", "accuracy"]]),
    (("evaluator", "name"), ["plain", "finetune", "full", "infcop", "adaptive_bn"]),
    (("evaluator", "kwargs"), [{"batches": 0}, {"batches": 10**9}, {"steps": -1}, {"epochs": 0}, {"lr": -1}, {}]),
    (("searcher", "name"), ["a2c", "cmaes", "ddpg", "dmcp", "global_magnitude", "gp", "nsga2", "optuna_random", "ppo",
                            "qmc", "random", "resrep", "sac", "sensitivity", "td3", "tpe", "uniform"]),
    (("searcher", "kwargs"), [{"n_startup_trials": 0}, {"n_startup_trials": -1}, {"population_size": 1},
                              {"warmup": -5}, {"seed": "x"}]),
    (("workers", "heartbeat_seconds"), [0, 1e-9, -1]), (("workers", "stale_seconds"), [0, -1, 1e-9]),
    (("export", "epochs"), [0, -1, 1e-9]), (("export", "formats"), [["onnx", "onnx"], ["exe"], []]),
    (("export", "calibration_batches"), [0, -1]), (("device",), ["cpu", "cuda", "meta", "cuda:1"]),
]
"""Values of the right type at the edges (zero, negative, tiny, huge; every name of a registry)."""

UNIVERSAL = ["", "x" * 5000, "é∂ƒ\u202e\u200b🙂", "-", "--", "=", "%s%n{0}", "\\", " ", "\t\n", "\ud800"]
"""Values that are wrong for every option (the lone surrogate only in-process: it cannot be an argv entry)."""


def _short(value: Any, limit: int = 220) -> str:
    """``repr(value)`` cut to ``limit`` characters (reproducers in failure lines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 20] + f"...<{len(text)} chars>"


# ---------------------------------------------------------------------------------------------------------------
# The harness (child side)
# ---------------------------------------------------------------------------------------------------------------


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``exc``'s traceback inside the repository."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if str(REPO) in f.filename and "/benchmarks/" not in f.filename] or frames
    if not inside:
        return "?"
    f = inside[-1]
    return f"{Path(f.filename).relative_to(REPO) if str(REPO) in f.filename else f.filename}:{f.lineno} in {f.name}"


def _build(cfg: Any) -> None:
    """The campaign build of ``tests/reliability/test_hostile_input.py`` (no training, nothing written)."""
    from autoprune import campaign
    from autoprune.store import TrialStore

    camp = campaign.build_campaign(cfg, measure_dense=False)
    campaign.make_campaign_searcher(camp, TrialStore(":memory:", campaign="fuzz"), cfg.searcher.name,
                                    seed=cfg.seed, kwargs=cfg.searcher.kwargs_for(cfg.searcher.name))


def _job_config_doc(payload: Any) -> str:
    from autoprune.config import config_from_dict

    config_from_dict(payload)
    return "accepted"


def _job_config_build(payload: tuple[Any, list[str]]) -> str:
    from autoprune.config import config_from_dict

    data, overrides = payload
    _build(config_from_dict(data, overrides))
    return "accepted"


def _job_config_file(payload: str) -> str:
    from autoprune.config import load_config

    _build(load_config(payload))
    return "accepted"


def _job_load_module(payload: str) -> str:
    """``load_module``, then one forward pass on an input of the recorded example shape."""
    import torch

    from autoprune.serialize import load_module

    gm = load_module(payload)
    spec = gm.meta.get("autoprune", {}).get("example_input", {}) if hasattr(gm, "meta") else {}
    try:
        shape = [int(s) for s in spec["shape"]]
        with torch.no_grad():
            out = gm(torch.rand(*shape))
        return "accepted" if isinstance(out, torch.Tensor) and torch.isfinite(out).all() else "accepted-odd-output"
    except Exception:  # a model that loads but does not run: reported in details, not a loader failure
        return "accepted-forward-failed"


def _job_checkpoint(payload: str) -> str:
    """``read_checkpoint`` and ``checkpoint_metadata`` (what ``evaluate``/``train --checkpoint`` read first)."""
    from autoprune.models.checkpoint import checkpoint_metadata, read_checkpoint

    read_checkpoint(payload)
    checkpoint_metadata(payload)
    return "accepted"


def _job_cli(argv: list[str]) -> dict[str, Any]:
    """``cli.main(argv)`` with stdout/stderr captured; an exception escaping ``main`` is an outcome of its own."""
    from autoprune import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: Any = cli.main(argv)
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # the very thing the fuzzer looks for
            return {"outcome": "exception", "error": f"{type(exc).__name__}: {str(exc)[:300]}", "where": _where(exc),
                    "stderr": err.getvalue()[-1500:]}
    return _exit_record(code, out.getvalue(), err.getvalue())


def _exit_record(code: Any, out: str, err: str) -> dict[str, Any]:
    """An ``exit`` outcome: the code, what the judge needs to know about the whole output, and an excerpt."""
    last = err.strip().splitlines()[-1][:200] if err.strip() else ""
    return {"outcome": "exit", "code": code, "traceback": "Traceback" in err, "error": "error:" in err,
            "hint": "hint:" in err, "usage": "usage:" in out + err, "check_failed": "check FAILED" in out + err,
            "last": last, "stderr": err[:300] + ("..." + err[-300:] if len(err) > 600 else err[300:600])}


_HANDLERS: dict[str, Callable[[Any], str]] = {
    "config_doc": _job_config_doc, "config_build": _job_config_build, "config_file": _job_config_file,
    "load_module": _job_load_module, "checkpoint": _job_checkpoint,
}


def _run_job(kind: str, payload: Any) -> dict[str, Any]:
    """Run one input; return its outcome (``accepted*``, ``refused``, ``exception``; ``exit`` for ``cli``)."""
    if kind == "cli":
        import logging

        logging.disable(logging.NOTSET)  # a logged traceback on stderr counts too
        return _job_cli(payload)
    from autoprune.errors import AutoPruneError

    try:
        return {"outcome": _HANDLERS[kind](payload)}
    except AutoPruneError as exc:
        return {"outcome": "refused", "error": type(exc).__name__, "message": str(exc.message)[:200],
                "has_hint": bool(exc.hint or exc.default_hint)}  # what the CLI prints as `hint:`
    except BaseException as exc:  # the very thing the fuzzer looks for
        return {"outcome": "exception", "error": f"{type(exc).__name__}: {str(exc)[:300]}", "where": _where(exc)}


def _child(jobs_path: str, start: int, fd: int) -> None:
    """Harness main loop: one JSON line per job on ``fd``, in order, from job ``start``."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # log lines of the loaders are not the outcome; cli.main re-enables its own
    jobs: list[Job] = pickle.loads(Path(jobs_path).read_bytes())
    with os.fdopen(fd, "w", buffering=1) as out:
        for i in range(start, len(jobs)):
            kind, payload = jobs[i]
            started = time.monotonic()
            res = _run_job(kind, payload)
            logging.disable(logging.CRITICAL)
            res.update(i=i, seconds=round(time.monotonic() - started, 3))
            out.write(json.dumps(res, default=str) + "\n")
            out.flush()


# ---------------------------------------------------------------------------------------------------------------
# Processes (parent side)
# ---------------------------------------------------------------------------------------------------------------


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _env() -> dict[str, str]:
    from tests.reliability import cli_env

    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _kill(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc``'s process group (it was started in a session of its own) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _read_line(fd: int, buf: bytearray, deadline: float) -> tuple[bytes | None, str]:
    """The next line from ``fd`` before ``deadline``: ``(line, "")``, else ``(None, "timeout"|"eof")``."""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, "timeout"
        ready, _, _ = select.select([fd], [], [], min(left, 5.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, "eof"
        buf.extend(chunk)
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line, ""


def run_harness(jobs: Sequence[Job], cwd: Path, tag: str) -> list[dict[str, Any]]:
    """Run ``jobs`` in harness interpreters (cwd ``cwd``); a crash or a hang is that job's outcome, and a fresh
    harness goes on with the next job.

    Returns:
        One outcome dict per job, in order.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    jobs_path = cwd / f".jobs-{tag}.pkl"
    jobs_path.write_bytes(pickle.dumps(list(jobs)))
    log_path = cwd / f".harness-{tag}.log"
    results: list[dict[str, Any]] = [{} for _ in jobs]
    start = 0
    while start < len(jobs):
        r, w = os.pipe()
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks._reliability.fuzz", str(jobs_path), str(start),
                                     str(w)], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, pass_fds=(w,), preexec_fn=_limits,
                                    start_new_session=True)
        os.close(w)
        buf = bytearray()
        i = start
        try:
            while i < len(jobs):
                extra = STARTUP_TIMEOUT if i == start else 0.0
                line, why = _read_line(r, buf, time.monotonic() + JOB_TIMEOUT + extra)
                if line is None:
                    tail = log_path.read_text(errors="replace")[-600:] if log_path.exists() else ""
                    results[i] = {"outcome": "timeout" if why == "timeout" else "crash",
                                  "error": f"harness {why} (exit {proc.poll()})", "where": tail.strip()[-300:]}
                    i += 1
                    break
                res = json.loads(line)
                results[res["i"]] = res
                i = res["i"] + 1
        finally:
            _kill(proc)
            os.close(r)
        start = i
    jobs_path.unlink(missing_ok=True)
    return results


def run_command(argv: Sequence[str], cwd: Path, timeout: float = JOB_TIMEOUT, *,
                module: str | None = "autoprune.cli") -> dict[str, Any]:
    """``python -m autoprune.cli ARGV`` (``python ARGV`` if ``module`` is None) in a process of its own; the
    outcome in the harness's ``exit`` form."""
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    head = [sys.executable, "-m", module] if module else [sys.executable]
    proc = subprocess.Popen([*head, *argv], cwd=cwd, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_limits, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return {"outcome": "timeout", "error": f"no exit within {timeout:.0f} s", "where": "subprocess"}
    finally:
        _kill(proc)
    return {**_exit_record(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")),
            "seconds": round(time.monotonic() - started, 3)}


# ---------------------------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------------------------


class Tally:
    """Counts outcomes per input family and records violations on the cell's result."""

    def __init__(self, result: CellResult) -> None:
        self.result = result
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.bugs: dict[str, dict[str, Any]] = {}
        self.subprocess_runs = 0
        self.missing_hint: dict[str, str] = {}

    def add(self, family: str, res: dict[str, Any], reproducer: Any, *, via: str = "in-process",
            check_failed_ok: bool = False) -> None:
        """Judge one outcome (``res`` from the harness or :func:`run_command`) of the input ``reproducer``."""
        self.result.fuzzed_inputs += 1
        if via == "subprocess":
            self.subprocess_runs += 1
        outcome = res.get("outcome", "missing")
        bad: str | None = None
        if outcome == "exit":
            code = res.get("code")
            if res.get("traceback"):
                bad = f"traceback on stderr (exit {code}): {res.get('last')}"
            elif code == 0:
                outcome = "exit 0"
            elif code == 2 and ((res.get("error") and res.get("hint")) or res.get("usage")):
                outcome = "exit 2 (error+hint)" if res.get("hint") else "exit 2 (usage)"
            elif code == 2 and res.get("error"):  # a clear user error, but without the hint every error should have
                outcome = "exit 2 (no hint)"
                self._no_hint(family, via, str(res.get("last")), reproducer)
            elif code == 1 and check_failed_ok and res.get("check_failed"):
                outcome = "exit 1 (check FAILED)"
            else:
                bad = f"exit {code} without error:+hint: ({res.get('last')})"
        elif outcome == "refused":
            outcome = f"refused ({res.get('error')})"
            if res.get("has_hint") is False:
                outcome += " no hint"
                self._no_hint(family, via, f"error: {res.get('message')}", reproducer)
        elif outcome.startswith("accepted"):
            pass
        else:
            bad = f"{outcome}: {res.get('error')} at {res.get('where')}"
        self.counts[family][outcome if bad is None else "VIOLATION"] += 1
        if bad is None:
            return
        self.result.unhandled_exceptions += 1
        signature = re.sub(r"\d+", "N", f"{family}|{bad}")[:160]
        bug = self.bugs.setdefault(signature, {"count": 0, "family": family, "what": bad, "via": via,
                                               "reproducer": _short(reproducer, 400)})
        bug["count"] += 1
        if bug["count"] == 1:
            self.result.fail(f"{family} [{via}]: {bad} <- {_short(reproducer)}")

    def _no_hint(self, family: str, via: str, line: str, reproducer: Any) -> None:
        """A user error without its ``hint:``: one failure line per distinct message (not an unhandled error)."""
        signature = re.sub(r"[{\[].*|\d+|'[^']*'|None", "_", line)[:60]
        if signature not in self.missing_hint:
            self.missing_hint[signature] = _short(reproducer, 300)
            self.result.fail(f"{family} [{via}]: user error without hint: ({line[:200]}) <- {_short(reproducer)}")

    def details(self, seconds: float) -> dict[str, Any]:
        """The cell's details: outcome counts per family, distinct problems, subprocess share, seconds."""
        return {"outcomes": {f: dict(sorted(c.items())) for f, c in sorted(self.counts.items())},
                "distinct_problems": list(self.bugs.values()), "subprocess_runs": self.subprocess_runs,
                "missing_hint": self.missing_hint,
                "seconds": round(seconds, 1)}


def _route(i: int) -> str:
    """Every :data:`SUBPROCESS_EVERY`-th input goes through a real command-line process."""
    return "subprocess" if i % SUBPROCESS_EVERY == SUBPROCESS_EVERY - 1 else "in-process"


def _run_routed(tally: Tally, work: Path, tag: str, items: Sequence[Item], log: Log, *,
                check_failed_ok: Callable[[Any], bool] = lambda _r: False) -> None:
    """Run the items: those with an ``argv`` as processes of their own, the others in the harness; judge every
    outcome."""
    inproc = [it for it in items if it.argv is None]
    res = run_harness([it.job for it in inproc], work / "harness", tag)
    for it, r in zip(inproc, res, strict=True):
        tally.add(it.family, r, it.reproducer, check_failed_ok=check_failed_ok(it.reproducer))
    sub = [it for it in items if it.argv is not None]
    for n, it in enumerate(sub):
        assert it.argv is not None
        cwd = it.cwd or work / "sub" / f"{tag}-{n}"
        if it.argv[0] == PYTHON:
            r = run_command(["-c", LOAD_MODULE, *it.argv[1:]], cwd, module=None)
        else:
            r = run_command(it.argv, cwd)
        tally.add(it.family, r, it.reproducer, via="subprocess", check_failed_ok=check_failed_ok(it.reproducer))
    log(f"{tag}: {len(inproc)} in-process, {len(sub)} command-line runs, "
        f"{tally.result.unhandled_exceptions} violations so far")


# ---------------------------------------------------------------------------------------------------------------
# fuzz|config
# ---------------------------------------------------------------------------------------------------------------


def _draw(strategy: Any, n: int, seed: int) -> list[Any]:
    """``n`` examples of a hypothesis strategy, deterministic for ``seed`` (generation only, no shrinking)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list[Any] = []

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x: Any) -> None:
        out.append(x)

    collect()
    return out[:n]


_HOSTILE_SCALARS = [
    ".nan", ".inf", "-.inf", "1e400", "-0", "0x7fffffffffffffffffff", "0o777", "1_000", "~", "[]", "{}", "yes",
    "off", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "!!binary aGVsbG8=", "!!set {a, b}",
    "!!python/object/apply:os.system [id]", "!!python/name:os.system", "*nope", "&x 1", "'\u202e\u200b'",
    '"\\x00"', '"\\ud800"', "'" + "x" * 3000 + "'", "-1", "0", "2147483648", "9007199254740993", "1e-320",
    "[1, [2, [3]]]", "{a: {b: {c: 1}}}", "!!int '3'", "!!float 'nan'", "@reserved", "`tick", "'🙂'", "ñ/é",
    "|\n  block\n  text", "!custom 1", "[a, b", "{a: 1", "'unterminated", "- a\n- b", "? complex\n: key",
    "!!str", "!!null ''", "<<: *nope", "2**64", "1e-5", "true", "null", "'0'", "-9999999999999999999999",
]
_BAD_KEYS = ["nme", "n_trials ", "N_TRIALS", "model ", "ünïcode", "''", "<<", "? x", "1", "null", "~", "'a.b'", "-x",
             "name" * 50]
_BAD_DOCS = ["", "~", "[]", "42", "'x'", "- a\n- b", "name: x", "{" * 100, "!!python/object:os.system {}", "\x00",
             "\ufeff", "...", "---\n---\n", "%YAML 1.1\n---\nname: x", "? [a, b]\n: c"]


def _yaml_mutant(rng: random.Random, text: str, bomb: str) -> bytes:  # noqa: C901 - one branch per mutation
    """One to three text-level mutations of a campaign YAML document (see the module docstring)."""
    for _ in range(rng.randint(1, 3)):
        lines = text.splitlines()
        op = rng.choice(["value", "value", "value", "key", "delete", "dup", "indent", "unknown", "merge", "bomb",
                         "nest", "truncate", "bytes", "multi", "doc", "section", "big", "plugins"])
        k = rng.randrange(len(lines)) if lines else 0
        if op in ("value", "key", "section") and lines:
            m = re.match(r"^(\s*)([^:]+):(.*)$", lines[k])
            if m:
                indent, key, value = m.groups()
                if op == "key":
                    key = rng.choice(_BAD_KEYS)
                else:
                    value = " " + rng.choice(_HOSTILE_SCALARS) if op == "value" or value.strip() else " 3"
                lines[k] = f"{indent}{key}:{value}"
        elif op == "delete" and lines:
            del lines[k]
        elif op == "dup" and lines:
            lines.insert(k, lines[k])
        elif op == "indent" and lines:
            lines[k] = rng.choice(["  ", " ", "\t", "    "]) + lines[k] if rng.random() < 0.6 else lines[k].lstrip()
        elif op == "unknown":
            lines.insert(k, rng.choice(["foo: 1", "  foo: 1", "model_name: x", "searchers: [tpe]", "Name: y"]))
        elif op == "merge":
            lines = ["base: &base {name: small_cnn, kwargs: {width: 4}}", *lines]
            lines.append(rng.choice(["extra:\n  <<: *base", "model:\n  <<: *base", "<<: *base", "<<: [*base, 3]"]))
        elif op == "bomb":
            alias = rng.choice(["*i", "*h", "*e", "*c"])
            lines = [*bomb.strip().splitlines(), *lines]
            lines.append(rng.choice([f"foo: {alias}", f"model:\n  kwargs: {{width: {alias}}}", f"name: {alias}"]))
        elif op == "nest":
            depth = rng.choice([10, 60, 63, 64, 65, 100, 1000, 30000])
            flow = rng.choice(["[" * depth + "]" * depth, "{a: " * depth + "1" + "}" * depth])
            lines.insert(k, rng.choice(["foo: ", "model:\n  kwargs: ", "n_trials: "]) + flow)
        elif op == "truncate":
            text = text[: rng.randrange(len(text) + 1)]
            continue
        elif op == "bytes":
            pos = rng.randrange(len(text) + 1)
            junk = rng.choice(["\x00", "\ufeff", "\r", "\x85", "\u2028", "\x1b[31m", "\t", "\udcff", "\x7f"])
            text = text[:pos] + junk + text[pos:]
            continue
        elif op == "multi":
            lines.insert(k, "---")
        elif op == "doc":
            lines = rng.choice(_BAD_DOCS).splitlines()
        elif op == "big" and lines:
            lines = lines + [lines[k]] * rng.choice([100, 10_000, 120_000])
        elif op == "plugins":
            lines.append("plugins: " + rng.choice(["[json]", "[nope_zz_mod]", "3", "['']", "['..']", "[os.path]"]))
        text = "\n".join(lines) + "\n"
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:  # invalid UTF-8 bytes
        pos = rng.randrange(len(data) + 1)
        data = data[:pos] + bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 4))) + data[pos:]
    return data


def _safe_overrides(data: Any, overrides: list[str], path: Path | None, cwd: Path, work: Path) -> list[str]:
    """Extra overrides that keep a command-line run of an *accepted* config bounded and inside ``work``:
    ``time_limit`` and ``time_limit_per_trial`` (a valid but enormous ``n_trials`` or evaluator setting must not run
    for hours) and, where the config would write
    outside ``work`` (an absolute or ``..`` output path), ``output_dir``."""
    from autoprune.config import config_from_dict, load_config

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            cfg = load_config(path, overrides) if path is not None else config_from_dict(data, overrides)
        out_dir = (cwd / cfg.out_dir).resolve()
    except Exception:  # refused (or worse): the run fails before writing; the harness judges such inputs too
        return []
    extra = ["time_limit=20", "time_limit_per_trial=30"]
    if not out_dir.is_relative_to(work.resolve()):
        extra.append(f"output_dir={cwd / 'out'}")
    return extra


def _config_cell(work: Path, seed: int, n: int, tally: Tally, log: Log) -> None:
    import yaml
    from hypothesis import strategies as st

    from tests.reliability import config_dict
    from tests.reliability.test_hostile_input import BOMB, PATHS, mutate, values

    rng = random.Random(seed)
    n_docs, n_build, n_edge = int(n * 0.3), int(n * 0.3), int(n * 0.2)
    n_text = n - n_docs - n_build - n_edge
    docs = _draw(st.one_of(values, st.dictionaries(st.text(max_size=10), values, max_size=6)), n_docs, seed)
    builds = _draw(st.tuples(st.sampled_from(PATHS), values, st.lists(st.sampled_from(OVERRIDES), max_size=2)),
                   n_build, seed + 1)
    log(f"fuzz|config: drew {len(docs)} documents and {len(builds)} single-key mutations (hypothesis, seed {seed})")
    items: list[Item] = []
    files = work / "configs"
    files.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        path, cwd = files / f"doc-{i}.yaml", work / "sub" / f"doc-{i}"
        if _route(i) == "subprocess":
            try:
                path.write_bytes(yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass"))
            except (yaml.YAMLError, RecursionError, ValueError):
                pass
            else:
                argv = ["-q", "search", str(path), *_safe_overrides(doc, [], None, cwd, work)]
                items.append(Item("document", ("", None), argv, doc, cwd))
                continue
        items.append(Item("document", ("config_doc", doc), None, doc))
    for i, (key_path, value, overrides) in enumerate(builds):
        path, cwd = files / f"key-{i}.yaml", work / "sub" / f"key-{i}"
        data = mutate(config_dict(cwd / "out"), key_path, value)
        repro = {"set": ".".join(key_path), "to": value, "overrides": overrides}
        if _route(i) == "in-process":
            items.append(Item("key mutation", ("config_build", (data, list(overrides))), None, repro))
            continue
        path.write_bytes(yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass"))
        argv = ["-q", "search", str(path), *overrides, *_safe_overrides(data, list(overrides), None, cwd, work)]
        items.append(Item("key mutation", ("", None), argv, repro, cwd))
    for i in range(n_edge):
        path, cwd = files / f"edge-{i}.yaml", work / "sub" / f"edge-{i}"
        data = config_dict(cwd / "out")
        chosen = [(key_path, rng.choice(options)) for key_path, options in rng.sample(EDGES, rng.randint(1, 3))]
        for key_path, value in chosen:
            data = mutate(data, key_path, value)
        repro = {".".join(k): v for k, v in chosen}
        if _route(i) == "in-process":
            items.append(Item("edge values", ("config_build", (data, [])), None, repro))
            continue
        path.write_text(yaml.safe_dump(data))
        items.append(Item("edge values", ("", None), ["-q", "search", str(path),
                                                      *_safe_overrides(data, [], None, cwd, work)], repro, cwd))
    base_text = yaml.safe_dump(config_dict(work / "text-out"))
    for i in range(n_text):
        path, cwd = files / f"text-{i}.yaml", work / "sub" / f"text-{i}"
        mutant = _yaml_mutant(rng, base_text.replace(str(work / "text-out"), str(cwd / "out")), BOMB)
        path.write_bytes(mutant)
        repro = {"yaml": mutant.decode("utf-8", "replace")[:300], "bytes": len(mutant)}
        if _route(i) == "in-process":
            items.append(Item("yaml text", ("config_file", str(path)), None, repro))
        else:
            argv = ["-q", "search", str(path), *_safe_overrides(None, [], path, cwd, work)]
            items.append(Item("yaml text", ("", None), argv, repro, cwd))
    _run_routed(tally, work, "config", items, log)


# ---------------------------------------------------------------------------------------------------------------
# fuzz|cli
# ---------------------------------------------------------------------------------------------------------------

_POOLS: dict[str, list[str]] = {
    "count": ["-1", "0", "abc", "1.5", "nan", "", "1e3", "-0", "0x10", "٣", " 2"],
    "int": ["-1", "abc", "2**31", "99999999999999999999999", "-0", "1e3", "", " 1", "-99999999999999999999"],
    "float": ["nan", "inf", "-inf", "-1", "0", "1e309", "abc", "", "1e-320", "2", "0x1p3", "1,5"],
    "epochs": ["nan", "inf", "-1", "0", "abc", "", "1e-9", "-0.0", "0.01"],
    "names": ["", ",", "tpe,,random", "nope", "TPE", "random,random", "uniform", "random ", "ü", "x" * 3000,
              "tpe;rm -rf /", "random,nope", "gp,"],
    "trial": ["-1", "abc", "random/seed0/999", "random/seedx/1", "/", "nope/0", "99999999999999999999", "best ",
              "random/seed-1/0", "0", "1", "random/0", "BEST", "random/seed0/-1"],
    "formats": ["exe", "", ",", "none,none", "onnx,exe", "NONE", "none,"],
    "finetune": ["", "nope", "FIXED", "none", "fixed "],
    "device": ["cuda:99", "tpu", "", "cpu:0", "cuda", "meta", "cpu", "mps", "-1", "cpu:99"],
    "model": ["nope", "os:getcwd", "torchvision:nope", "small_cnn", "resnet20", "json:loads", "", "a:b:c", ":", "x:"],
    "dataset": ["nope", "cifar10", "DIGITS", "", "image_folder", "digits", "json:loads", "os:getcwd"],
    "kv": ["image_size=32", "=", "a", "x=[1,", "k=!!python/object:os.system", "seed=1e400", "val_size=abc",
           "a=b=c"],
    "size": ["-1", "0", "1.5", "abc", "nan", "1e9", "0.999999", "1", "0.0", "-0.5"],
    "choice": ["", "nope", "IF", "none", "structured", "mean", "l2", "test", "val"],
    "list": ["", "nope", "all", "models", "SEARCHERS", "searcher"],
    "threads": ["0", "-1", "abc", "99999", "1", ""],
    "plugin": ["nope_zz", "", "json", "os.path", "a b", "..", "x" * 300, "a.", ".a", "1abc"],
}
_OPTIONS: dict[str, dict[str, str]] = {
    "search": {}, "worker": {},
    "compare": {"--agents": "names", "--seeds": "count", "--reference": "names"},
    "report": {"--out": "out", "--reference": "names"},
    "export": {"--trial": "trial", "--searcher": "names", "--seed": "int", "--finetune": "finetune",
               "--epochs": "epochs", "--formats": "formats", "--out": "out"},
    "evaluate": {"--checkpoint": "path", "--model": "model", "--dataset": "dataset", "--data-dir": "path",
                 "--data-option": "kv", "--val-size": "size", "--seed": "int", "--batch-size": "count",
                 "--device": "device", "--split": "choice"},
    "train": {"--model": "model", "--dataset": "dataset", "--epochs": "count", "--lr": "float",
              "--momentum": "float", "--weight-decay": "float", "--label-smoothing": "float", "--schedule": "choice",
              "--warmup-epochs": "float", "--checkpoint": "path", "--out": "out", "--val-size": "size",
              "--batch-size": "count", "--device": "device", "--data-option": "kv", "--seed": "int"},
    "imp": {"--model": "model", "--dataset": "dataset", "--checkpoint": "path", "--iterations": "count",
            "--prune-ratio": "float", "--p": "float", "--q": "float", "--beta": "float", "--min-keep": "float",
            "--eps": "float", "--flow": "choice", "--granularity": "choice", "--scope": "choice", "--form": "choice",
            "--reduce": "choice", "--stat": "choice", "--flow-samples": "count", "--rounds": "count",
            "--round-epochs": "epochs", "--warmup-rounds": "count", "--lr": "float", "--out": "out",
            "--batch-size": "count", "--device": "device", "--seed": "int"},
    "quickstart": {"--out": "out", "--epochs": "count", "--agents": "names", "--trials": "count", "--seed": "int",
                   "--device": "device"},
    "list": {},
}
_FLAGS: dict[str, list[str]] = {
    "train": ["--nesterov", "--no-augment", "--resume"], "evaluate": ["--per-class", "--json"],
    "imp": ["--lth", "--pq", "--no-rewind", "--no-accuracy-stop", "--no-augment"], "quickstart": ["--retrain"],
    "export": ["--no-latency"],
}
_CAMPAIGN = {"search", "worker", "compare", "export"}
_ARGV_OPS = {"option": 6, "override": 3, "global": 2, "positional": 1, "flag": 1, "dup": 1, "drop": 0.7,
             "unknown": 0.7, "command": 0.4, "help": 0.4, "shuffle": 0.4}
"""Mutations of a command line and their weights (most keep it parseable, so that the command's own checks run)."""


def _paths(ctx: dict[str, Path]) -> tuple[list[str], list[str]]:
    """Paths to read (any existing or odd path) and paths to write (never ``/`` or outside the scratch tree)."""
    odd = ["", "/nonexistent/x/y", "/dev/null", "é∂ƒ/ü", "x" * 5000, "-", "~nouser/x", "/proc/self/status", "."]
    read = [*odd, "/", "../../../../../..", *(str(p) for p in ctx.values())]
    write = ["", "/dev/null", "/proc/nope/x", "/sys/nope", "é∂ƒ/ü", "x" * 5000, "-", str(ctx["text"]),
             str(ctx["db"]), str(ctx["ckpt"]), str(ctx["camp"] / "config.resolved.yaml")]
    return read, write


def _templates(ctx: dict[str, Path], k: int) -> dict[str, list[str]]:
    """A cheap, valid command line per subcommand (``k`` makes its output directory unique)."""
    out = str(ctx["runs"] / f"r{k}")
    return {
        "search": ["search", str(ctx["config"])], "worker": ["worker", str(ctx["config"])],
        "compare": ["compare", str(ctx["config"]), "--agents", "random", "--seeds", "1", "--reference", "uniform"],
        "report": ["report", str(ctx["camp"]), "--out", out],
        "export": ["export", str(ctx["camp"]), "--trial", "best", "--finetune", "none", "--formats", "none",
                   "--no-latency", "--out", out],
        "evaluate": ["evaluate", "--checkpoint", str(ctx["ckpt"]), "--dataset", "digits", "--batch-size", "256"],
        "train": ["train", "--model", "small_cnn", "--dataset", "digits", "--epochs", "1", "--out", out],
        "imp": ["imp", "--model", "small_cnn", "--checkpoint", str(ctx["ckpt"]), "--dataset", "digits",
                "--iterations", "1", "--rounds", "1", "--round-epochs", "0.2", "--warmup-rounds", "0", "--flow",
                "none", "--out", out],
        "quickstart": ["quickstart", "--out", out, "--epochs", "1", "--trials", "1", "--agents", "random"],
        "list": ["list", "searchers"],
    }


def _set_option(argv: list[str], option: str, value: str) -> None:
    if option in argv:
        j = argv.index(option)
        if j + 1 < len(argv):
            argv[j + 1] = value
            return
    argv += [option, value]


def _argv_mutant(rng: random.Random, ctx: dict[str, Path], k: int) -> list[str]:  # noqa: C901 - one branch per op
    """A random command line: a valid template of a random subcommand with one to three mutations."""
    templates = _templates(ctx, k)
    command = rng.choice(list(templates))
    argv = list(templates[command])
    options = _OPTIONS[command]
    read, write = _paths(ctx)

    def value(kind: str) -> str:
        if rng.random() < 0.15:
            return rng.choice(UNIVERSAL)
        if kind == "path":
            return rng.choice(read)
        if kind == "out":
            return rng.choice(write)
        return rng.choice(_POOLS[kind])

    if command == "quickstart":  # a valid quickstart trains and searches for a minute: keep one value wrong
        _set_option(argv, rng.choice(["--epochs", "--trials"]), rng.choice(["abc", "-1", "0", "1.5", "", "nan"]))
    for _ in range(rng.randint(1, 3)):
        op = rng.choices(list(_ARGV_OPS), weights=list(_ARGV_OPS.values()))[0]
        if op == "option" and options:
            opt = rng.choice(list(options))
            _set_option(argv, opt, value(options[opt]))
        elif op == "option" and command == "list":
            argv[1:] = [value("list")]
        elif op == "drop" and len(argv) > 1:
            del argv[rng.randrange(1, len(argv))]
        elif op == "dup" and len(argv) > 2:
            j = rng.randrange(1, len(argv) - 1)
            argv += argv[j:j + 2]
        elif op == "unknown":
            argv += rng.choice([["--nope"], ["--n-trials", "5"], ["-x"], ["--trials=3"], ["---"], ["--="], ["-qq"],
                                ["--searcher.name", "tpe"], ["extra"], ["a=b"]])
        elif op == "override" and command in _CAMPAIGN:
            argv += rng.sample(OVERRIDES, rng.randint(1, 2))
        elif op == "global":
            glob = rng.choice([["--threads", value("threads")], ["--plugin", value("plugin")], ["-q"], ["--version"],
                               ["--threads"], ["--plugin"]])
            argv = [*glob, *argv] if rng.random() < 0.7 else [*argv, *glob]
        elif op == "positional" and command in ("search", "worker", "compare", "report", "export"):
            argv[1] = value("path")
        elif op == "flag" and command in _FLAGS:
            argv.append(rng.choice(_FLAGS[command]))
        elif op == "command":
            argv[0] = rng.choice(["serach", "SEARCH", "", "lst", "search ", "-", "é", "x" * 300, "help"])
        elif op == "help":
            argv.insert(rng.randrange(len(argv) + 1), rng.choice(["--help", "-h"]))
        elif op == "shuffle":
            head, tail = argv[:1], argv[1:]
            rng.shuffle(tail)
            argv = head + tail
    return argv


def _setup_campaign(work: Path, log: Log, *, name: str = "fuzz", n_trials: int = 3,
                    **patch: Any) -> tuple[Path, Path]:
    """A finished small campaign (``autoprune search`` in a process of its own): ``(config file, campaign dir)``."""
    import yaml

    from tests.reliability import config_dict

    camp = work / f"camp-{name}"
    config = work / f"camp-{name}.yaml"
    data = config_dict(camp, name=name, n_trials=n_trials, evaluator={"name": "plain"}, **patch)
    config.write_text(yaml.safe_dump(data))
    res = run_command(["-q", "search", str(config)], work, timeout=300)
    if res.get("code") != 0:
        raise RuntimeError(f"setup search failed: {res}")
    log(f"setup: campaign {camp} ({n_trials} trials, {res.get('seconds')} s)")
    return config, camp


def _setup_checkpoint(work: Path, log: Log) -> Path:
    """A training checkpoint of ``small_cnn`` on the digits (``autoprune train``, one epoch)."""
    out = work / "train"
    res = run_command(["-q", "train", "--model", "small_cnn", "--dataset", "digits", "--epochs", "1", "--out",
                       str(out)], work, timeout=300)
    if res.get("code") != 0:
        raise RuntimeError(f"setup train failed: {res}")
    log(f"setup: checkpoint {out / 'checkpoint.pt'} ({res.get('seconds')} s)")
    return out / "checkpoint.pt"


def _cli_cell(work: Path, seed: int, n: int, tally: Tally, log: Log) -> None:
    import yaml

    from tests.reliability import config_dict

    rng = random.Random(seed)
    _, camp = _setup_campaign(work, log)
    ckpt = _setup_checkpoint(work, log)
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(config_dict(work / "run", name="cli", n_trials=2, evaluator={"name": "plain"})))
    (work / "notes.txt").write_text("not a config\n")
    (work / "empty").mkdir(exist_ok=True)
    ctx = {"config": config, "camp": camp, "ckpt": ckpt, "db": camp / "trials.db", "text": work / "notes.txt",
           "empty": work / "empty", "runs": work / "runs"}
    items: list[Item] = []
    for i in range(n):
        argv = _argv_mutant(rng, ctx, i)
        family = next((a for a in argv if a in _OPTIONS), "no command")
        routed = _route(i) == "subprocess" and not any("\x00" in a or "\ud800" in a for a in argv)
        items.append(Item(family, ("cli", ["-q", *argv]), ["-q", *argv] if routed else None, argv))
    _run_routed(tally, work, "cli", items, log,
                check_failed_ok=lambda argv: "quickstart" in argv or "export" in argv)


# ---------------------------------------------------------------------------------------------------------------
# fuzz|files
# ---------------------------------------------------------------------------------------------------------------


def _byte_mutant(rng: random.Random, blob: bytes) -> tuple[bytes, str]:
    """Bit flips, a truncation, appended junk, a zeroed or duplicated range, or an emptied file."""
    op = rng.choice(["flip", "flip", "truncate", "append", "zero", "dup", "empty", "insert"])
    b = bytearray(blob)
    if op == "flip" and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        b = b[: rng.randrange(len(b) + 1)]
    elif op == "append":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    elif op == "zero" and b:
        j = rng.randrange(len(b))
        b[j:j + rng.randint(1, 4096)] = bytes(len(b[j:j + rng.randint(1, 4096)]))
    elif op == "dup" and b:
        j = rng.randrange(len(b))
        b[j:j] = b[j:j + rng.randint(1, 4096)]
    elif op == "empty":
        b = bytearray()
    elif op == "insert":
        j = rng.randrange(len(b) + 1)
        b[j:j] = rng.choice([b"\x00", b"PK\x03\x04", b"\x80\x04", b'{"a":', b"\xff" * 64])
    return bytes(b), op


_JSON_VALUES: list[Any] = [None, True, False, -1, 0, 1, 2**31, 2**63, 10**30, 1e308, -1e308, 0.5, "x", "", [], {},
                           "torch.nn.ReLU", "os.system", "builtins.eval", "torch.nn.Conv2d", [1, [2]], {"a": 1},
                           "NaN", list(range(50)), "x" * 5000, "call_module", "placeholder", "output", 4096,
                           [4096, 4096], 100_000]


def _json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for k, v in enumerate(node):
            out += _json_paths(v, (*prefix, k))
    return out


def _json_mutant(rng: random.Random, doc: Any, keep: Callable[[tuple[Any, ...]], bool] = lambda _p: True
                 ) -> tuple[Any, str]:
    """One structural edit of a JSON document: a field set to a value of a wrong type or size, deleted, renamed,
    a list shuffled or an element duplicated."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _json_paths(doc) if keep(p)]
    if not paths:
        return doc, "none"
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    op = rng.choice(["set", "set", "set", "delete", "rename", "shuffle", "dup", "nudge"])
    if op == "set":
        parent[last] = copy.deepcopy(rng.choice(_JSON_VALUES))
    elif op == "delete":
        del parent[last]
    elif op == "rename" and isinstance(parent, dict):
        parent[rng.choice(["x", "", "__class__", str(last).upper()])] = parent.pop(last)
    elif op == "shuffle" and isinstance(parent[last], list):
        rng.shuffle(parent[last])
    elif op == "dup" and isinstance(parent[last], list) and parent[last]:
        parent[last].append(copy.deepcopy(rng.choice(parent[last])))
    elif op == "nudge" and isinstance(parent[last], int | float) and not isinstance(parent[last], bool):
        parent[last] = rng.choice([parent[last] + 1, parent[last] - 1, -parent[last], parent[last] * 1000])
    else:
        parent[last] = None
    return doc, f"{op} {'/'.join(map(str, path))[:120]}"


def _reseal(model: Path) -> None:
    """Record the SHA-256 and size of ``weights.pt`` in ``arch.json`` (a tamperer who edits both files)."""
    import hashlib

    arch = json.loads((model / "arch.json").read_text())
    blob = (model / "weights.pt").read_bytes()
    arch["manifest"]["weights.pt"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (model / "arch.json").write_text(json.dumps(arch))


def _tensor_mutant(rng: random.Random, tensors: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The weights dict with one tensor of the wrong shape/dtype/value, one missing, or an extra entry."""
    import torch

    t = dict(tensors)
    key = rng.choice(sorted(t))
    op = rng.choice(["shape", "dtype", "nan", "drop", "extra", "scalar", "empty", "huge-dim"])
    if op == "shape":
        shape = [s + rng.choice([1, -1 if s > 1 else 1, 7]) for s in t[key].shape]
        t[key] = torch.zeros(*(shape or [3]))
    elif op == "dtype":
        t[key] = t[key].to(rng.choice([torch.int64, torch.float16, torch.bool, torch.complex64, torch.uint8]))
    elif op == "nan":
        t[key] = torch.full_like(t[key], float("nan")) if t[key].is_floating_point() else t[key]
    elif op == "drop":
        del t[key]
    elif op == "extra":
        t[rng.choice(["x", key + ".extra", "", "../x"])] = torch.zeros(2)
    elif op == "scalar":
        t[key] = torch.tensor(1.0)
    elif op == "empty":
        t[key] = torch.zeros(0)
    elif op == "huge-dim":
        t[key] = torch.zeros(1).expand(2**20)
    return t, f"tensor {op} {key}"


def _checkpoint_mutant(rng: random.Random, payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """An autoprune checkpoint payload with one field changed (format, version, model name/kwargs, state)."""
    import torch

    p = copy.copy(payload)
    field = rng.choice(["format", "version", "model_name", "model_kwargs", "state_dict", "state_dict", "epoch",
                        "extra", "drop"])
    if field == "format":
        p["format"] = rng.choice(["nope", None, 3, ""])
    elif field == "version":
        p["version"] = rng.choice([0, 2, 99, -1, "1", None])
    elif field == "model_name":
        p["model_name"] = rng.choice(["nope", "os:getcwd", "torchvision:nope", None, 3, "", "resnet20", "x" * 3000])
    elif field == "model_kwargs":
        p["model_kwargs"] = rng.choice([{"width": -1}, {"width": "x"}, {"nope": 1}, [], None, {"width": 0},
                                        {"width": 3}, {"in_channels": 5}])
    elif field == "state_dict":
        sd, what = _tensor_mutant(rng, dict(p["state_dict"]))
        p["state_dict"] = rng.choice([sd, sd, {}, [], None, {"a": 1}])
        return p, f"checkpoint state_dict: {what}"
    elif field == "epoch":
        p["epoch"] = rng.choice([-1, "x", 1e300, None, [1]])
    elif field == "extra":
        extra = dict(p.get("extra") or {})
        key = rng.choice(["dataset", "seed", "val_size", "train_state", "metrics"])
        extra[key] = rng.choice([None, "x", -1, 2**40, -5.0, [], {}, {"rng": "x"}, torch.tensor(float("nan"))])
        p["extra"] = rng.choice([None, [], "x", extra, extra, extra])
    else:
        p.pop(rng.choice(sorted(p)))
    return p, f"checkpoint {field}"


_SQL_EDITS = [
    "UPDATE trial_user_attributes SET value_json = {v} WHERE trial_user_attribute_id IN "
    "(SELECT trial_user_attribute_id FROM trial_user_attributes {order} LIMIT {n})",
    "UPDATE trial_values SET value = {v} WHERE trial_value_id IN (SELECT trial_value_id FROM trial_values "
    "{order} LIMIT {n})",
    "UPDATE trials SET state = {s} WHERE trial_id IN (SELECT trial_id FROM trials {order} LIMIT {n})",
    "DELETE FROM trial_user_attributes WHERE trial_user_attribute_id IN (SELECT trial_user_attribute_id FROM "
    "trial_user_attributes {order} LIMIT {n})",
    "DELETE FROM trial_values WHERE trial_value_id IN (SELECT trial_value_id FROM trial_values {order} "
    "LIMIT {n})",
    "DELETE FROM trials WHERE trial_id IN (SELECT trial_id FROM trials {order} LIMIT {n})",
    "UPDATE trials SET number = number + {n}",
    "UPDATE trial_params SET param_value = {v} WHERE param_id IN (SELECT param_id FROM trial_params {order} "
    "LIMIT {n})",
    "UPDATE trial_params SET distribution_json = {v} WHERE param_id IN (SELECT param_id FROM trial_params ORDER BY "
    "random() LIMIT {n})",
    "UPDATE studies SET study_name = {v}",
    "DELETE FROM study_directions",
    "UPDATE study_user_attributes SET value_json = {v}",
    "DROP TABLE {t}",
    "UPDATE version_info SET schema_version = 999",
    "UPDATE trials SET datetime_start = {v}",
]
_SQL_VALUES = ["NULL", "'null'", "'\"x\"'", "'{'", "'NaN'", "'1e999'", "'[1,2]'", "'{\"a\": 1}'", "-1", "'x'",
               "1e308", "'Infinity'", "'\"\"'", "x'00ff'", "'" + "9" * 400 + "'"]


def _sql_mutant(rng: random.Random, db: Path) -> str:
    """Apply one random SQL edit to ``db`` (a copy); return it (or the error SQLite raised: the store is unchanged).

    Rows are picked by a seeded permutation of their ``rowid`` (not SQLite's unseeded ``random()``), so that the
    same seed makes the same edits."""
    sql = rng.choice(_SQL_EDITS).format(v=rng.choice(_SQL_VALUES), n=rng.randint(1, 20),
                                        order=f"ORDER BY (rowid * {rng.randrange(1, 1009)}) % 1009",
                                        s=rng.choice(["'RUNNING'", "'FAIL'", "'WAITING'", "'BOGUS'", "NULL", "5"]),
                                        t=rng.choice(["trial_values", "trial_user_attributes", "trial_params",
                                                      "study_directions", "alembic_version"]))
    con = sqlite3.connect(db)
    try:
        con.execute(sql)
        con.commit()
    except sqlite3.Error as exc:
        sql += f"  [sqlite refused: {exc}]"
    finally:
        con.close()
    return sql


def _files_cell(work: Path, seed: int, n: int, quick: bool, tally: Tally, log: Log) -> None:  # noqa: C901
    import torch
    import yaml

    rng = random.Random(seed)
    _, camp = _setup_campaign(work, log)
    ckpt = _setup_checkpoint(work, log)
    exports: dict[str, Path] = {}
    res = run_command(["-q", "export", str(camp), "--epochs", "0.05", "--formats", "none", "--no-latency", "--out",
                       str(work / "export")], work, timeout=300)
    if res.get("code") != 0:
        raise RuntimeError(f"setup export failed: {res}")
    exports["pruned"] = work / "export" / "model"
    if not quick:
        _, qcamp = _setup_campaign(work, log, name="fuzzq", n_trials=2, search_space={"quantize": True})
        res = run_command(["-q", "export", str(qcamp), "--epochs", "0.05", "--formats", "none", "--no-latency",
                           "--out", str(work / "qexport")], work, timeout=300)
        if res.get("code") == 0:
            exports["quantized"] = work / "qexport" / "model"
        else:
            log(f"setup: quantized export failed, skipped: {str(res.get('stderr'))[-200:]}")
    log(f"setup: exported models {', '.join(exports)}")
    mutants = work / "mutants"
    mutants.mkdir(exist_ok=True)
    weights0 = {k: torch.load(m / "weights.pt", map_location="cpu", weights_only=True) for k, m in exports.items()}
    payload0 = torch.load(ckpt, map_location="cpu", weights_only=True)
    kinds = ["arch-json", "arch-json", "arch-json", "arch-bytes", "weights-bytes", "weights-resealed",
             "weights-tensors", "checkpoint-bytes", "checkpoint-fields", "checkpoint-fields", "store-sql",
             "store-sql", "store-bytes", "resolved-config"]
    items: list[Item] = []
    for i in range(n):
        kind = kinds[i % len(kinds)] if quick else rng.choice(kinds)
        sub = _route(i) == "subprocess"
        target = mutants / f"{i}"
        if kind.startswith(("arch", "weights")):
            which = rng.choice(sorted(exports))
            shutil.copytree(exports[which], target)
            arch_path, w_path = target / "arch.json", target / "weights.pt"
            if kind == "arch-json":
                doc, what = _json_mutant(rng, json.loads(arch_path.read_text()),
                                         keep=lambda p: p[0] not in ("manifest", "autoprune_version", "torch_version"))
                arch_path.write_text(json.dumps(doc, allow_nan=True))
            elif kind == "arch-bytes":
                blob, what = _byte_mutant(rng, arch_path.read_bytes())
                arch_path.write_bytes(blob)
            elif kind == "weights-bytes":
                blob, what = _byte_mutant(rng, w_path.read_bytes())
                w_path.write_bytes(blob)
            elif kind == "weights-resealed":
                blob, what = _byte_mutant(rng, w_path.read_bytes())
                w_path.write_bytes(blob)
                _reseal(target)
            else:
                tensors, what = _tensor_mutant(rng, weights0[which])
                torch.save(tensors, w_path)
                _reseal(target)
            repro = {"file": f"{which} export model ({kind})", "mutation": what}
            items.append(Item(kind, ("load_module", str(target)), [PYTHON, str(target)] if sub else None, repro))
        elif kind.startswith("checkpoint"):
            target.mkdir()
            path = target / "checkpoint.pt"
            if kind == "checkpoint-bytes":
                blob, what = _byte_mutant(rng, ckpt.read_bytes())
                path.write_bytes(blob)
            else:
                payload, what = _checkpoint_mutant(rng, payload0)
                torch.save(payload, path)
            use = rng.choice(["evaluate", "evaluate", "train --checkpoint", "train --resume", "read"])
            repro = {"file": "train checkpoint", "mutation": what, "command": use}
            if sub or use != "read":
                argv = {"evaluate": ["-q", "evaluate", "--checkpoint", str(path), "--dataset", "digits"],
                        "train --checkpoint": ["-q", "train", "--model", "small_cnn", "--dataset", "digits",
                                               "--epochs", "0", "--checkpoint", str(path), "--out", str(target / "t")],
                        "train --resume": ["-q", "train", "--model", "small_cnn", "--dataset", "digits", "--epochs",
                                           "1", "--resume", "--out", str(target)],
                        "read": ["-q", "evaluate", "--checkpoint", str(path), "--dataset", "digits"]}[use]
                items.append(Item(kind, ("cli", argv), argv if sub else None, repro))
            else:
                items.append(Item(kind, ("checkpoint", str(path)), None, repro))
        else:
            shutil.copytree(camp, target, ignore=shutil.ignore_patterns("report", "export"))
            db = target / "trials.db"
            if kind == "store-sql":
                what = _sql_mutant(rng, db)
            elif kind == "store-bytes":
                with contextlib.suppress(sqlite3.Error):  # fold the WAL into the file first: a single file to damage
                    con = sqlite3.connect(db)
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    con.close()
                blob, what = _byte_mutant(rng, db.read_bytes())
                db.write_bytes(blob)
                for side in ("trials.db-wal", "trials.db-shm"):
                    (target / side).unlink(missing_ok=True)
            else:
                resolved = target / "config.resolved.yaml"
                if rng.random() < 0.5:
                    blob, what = _byte_mutant(rng, resolved.read_bytes())
                    resolved.write_bytes(blob)
                else:
                    doc, what = _json_mutant(rng, yaml.safe_load(resolved.read_text()))
                    resolved.write_text(yaml.safe_dump(doc))
            command = rng.choice(["report", "export", "search"])
            if command == "report":
                argv = ["-q", "report", str(target), "--out", str(target / "report")]
            elif command == "export":
                argv = ["-q", "export", str(target), "--finetune", "none", "--formats", "none", "--no-latency",
                        "--out", str(target / "export")]
            else:  # resume the campaign one trial further on the damaged store
                argv = ["-q", "search", str(target / "config.resolved.yaml"), f"output_dir={target}", "n_trials=4"]
            repro = {"file": f"campaign {kind}", "mutation": what, "command": command}
            items.append(Item(kind, ("cli", argv), argv if sub else None, repro))
    _run_routed(tally, work, "files", items, log,
                check_failed_ok=lambda r: isinstance(r, dict) and r.get("command") == "export")


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def run_cell(name: str, work: Path, seed: int, log: Log, quick: bool = False) -> CellResult:
    """Run one fuzz cell (see the module docstring) in the scratch directory ``work``.

    Args:
        name: One of :data:`CELLS`.
        work: Empty scratch directory the cell owns.
        seed: Seed of every random choice (the same seed draws the same inputs).
        log: Progress-line printer.
        quick: ~30 inputs instead of the full count.

    Returns:
        The cell's :class:`CellResult`: ``fuzzed_inputs``, ``unhandled_exceptions`` and one failure line per
        distinct problem; details hold the outcome counts per input family and the seconds.
    """
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; cells: {CELLS}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    result = CellResult()
    tally = Tally(result)
    n = SIZES[name][1 if quick else 0]
    started = time.monotonic()
    if name == "fuzz|config":
        _config_cell(work, seed, n, tally, log)
    elif name == "fuzz|cli":
        _cli_cell(work, seed, n, tally, log)
    else:
        _files_cell(work, seed, n, quick, tally, log)
    result.details = tally.details(time.monotonic() - started)
    log(f"{name}: {result.fuzzed_inputs} inputs, {result.unhandled_exceptions} unhandled, "
        f"{result.details['seconds']} s")
    return result


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
