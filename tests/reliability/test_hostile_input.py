"""Hostile input: fuzzed configs through the CLI path, YAML bombs, oversized documents, and checkpoint / exported
model files that are truncated, tampered with or carry pickled code. Only :class:`AutoPruneError` (with
``ConfigError`` / ``CheckpointError``) may come out — never another exception, never executed code.

Also a source scan: no ``torch.load`` without ``weights_only=True``, no ``eval(``/``exec(``, no ``yaml.load(``
and no ``pickle.load`` outside the restricted dataset unpickler; and a checkpoint that names its model by an
import string does not make ``autoprune evaluate`` import it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from autoprune import campaign
from autoprune.commands.evaluate import resolve_model_args
from autoprune.config import config_from_dict, load_config
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError
from autoprune.models.checkpoint import read_checkpoint
from autoprune.serialize import load_module, save_module

from . import config_dict

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[2]
TRIED = {"config": 0, "build": 0}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF), max_size=8),
    st.just("x" * 5000),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)
PATHS = [("name",), ("n_trials",), ("seed",), ("time_limit",), ("time_limit_per_trial",), ("storage_timeout",),
         ("model", "name"), ("model", "kwargs"), ("model", "kwargs", "width"), ("model", "checkpoint"),
         ("dataset", "name"), ("dataset", "batch_size"), ("dataset", "eval_batch_size"), ("dataset", "val_size"),
         ("dataset", "seed"), ("search_space",), ("search_space", "min_ratio"), ("search_space", "round_to"),
         ("search_space", "family"), ("search_space", "exclude"), ("search_space", "w_bits"),
         ("search_space", "quantize"), ("search_space", "importance"), ("objective", "reward"),
         ("objective", "kwargs"), ("objective", "objectives"), ("objective", "budget", "macs"),
         ("objective", "budget", "params"), ("evaluator", "name"), ("evaluator", "kwargs"),
         ("evaluator", "kwargs", "batches"), ("searcher", "name"), ("searcher", "kwargs"), ("workers",),
         ("export",), ("output_dir",)]


def mutate(base: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(base)
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return data


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(values, st.dictionaries(st.text(max_size=10), values, max_size=6)))
def test_arbitrary_documents_give_only_config_errors(data: Any) -> None:
    TRIED["config"] += 1
    with contextlib.suppress(AutoPruneError):
        config_from_dict(data)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return config_dict(tmp_path_factory.mktemp("fuzz") / "out")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), value=values, overrides=st.lists(st.sampled_from(
    ["n_trials=0", "seed=-1", "dataset.batch_size=99999999999", "search_space.min_ratio=1e-300",
     "objective.budget.macs=1e300", "model.kwargs.width=0", "model.kwargs.width=-3", "search_space.round_to=4096",
     "evaluator.kwargs.batches=0", "searcher.name=nope", "a.b.c=[1, {x: 2}]", "=1", "name=é/é"]), max_size=2))
def test_fuzzed_configs_through_the_campaign_build_give_only_user_errors(base: dict[str, Any], path: tuple[str, ...],
                                                                        value: Any, overrides: list[str]) -> None:
    """``config_from_dict`` then the campaign build (model, data, graph, space, evaluator, searcher; no training)."""
    TRIED["config"] += 1
    try:
        cfg = config_from_dict(mutate(base, path, value), overrides)
        TRIED["build"] += 1
        camp = campaign.build_campaign(cfg, measure_dense=False)
        from autoprune.store import TrialStore

        campaign.make_campaign_searcher(camp, TrialStore(":memory:", campaign="fuzz"), cfg.searcher.name,
                                        seed=cfg.seed, kwargs=cfg.searcher.kwargs_for(cfg.searcher.name))
    except AutoPruneError:
        pass


def test_fuzz_counts_are_reported() -> None:
    assert TRIED["config"] >= 250, TRIED  # runs after the fuzz tests above (file order)
    print(f"fuzzed inputs tried: {TRIED}")


BOMB = """
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize("text,message", [
    ("name: x\nmodel:\n  name: small_cnn\n  kwargs: {bomb: *i}\n", None),
    ("[" * 20000 + "]" * 20000, "nest"),
    ("name: '" + "x" * 1_100_000 + "'\n", "limit"),
    ("model: {kwargs: " + "{a: " * 200 + "1" + "}" * 200 + "}\n", "deeper"),
], ids=["billion-laughs", "deep-flow", "huge-string", "deep-mapping"])
def test_yaml_bombs_and_oversized_documents_are_refused_quickly(tmp_path: Path, text: str, message: str | None
                                                                ) -> None:
    if message is None:
        text = BOMB + text
        message = "expands to more than"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.process_time()  # CPU seconds of this process: what the refusal costs, whatever else runs
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert time.process_time() - started < 10


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pickled code ran",))


def test_hostile_checkpoints_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.pt"
    torch.save(nn.Linear(3, 2).state_dict(), good)
    blob = good.read_bytes()
    cases = {"truncated.pt": blob[: len(blob) // 2], "empty.pt": b"", "garbage.pt": b"\x80\x04not a checkpoint"}
    buf = io.BytesIO()
    torch.save({"state_dict": nn.Linear(3, 2).state_dict(), "evil": _Payload()}, buf)
    cases["code.pt"] = buf.getvalue()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError):
            read_checkpoint(tmp_path / name)
    assert "pickled code ran" not in capsys.readouterr().out


def test_tampered_or_truncated_exported_models_are_refused(tmp_path: Path) -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)))
    x = torch.rand(1, 1, 8, 8)
    out = tmp_path / "m"
    save_module(gm, out, x)
    assert torch.allclose(load_module(out)(x), gm(x))
    weights, arch = out / "weights.pt", out / "arch.json"
    original_w, original_a = weights.read_bytes(), arch.read_text()
    flipped = bytearray(original_w)
    flipped[len(flipped) // 2] ^= 0xFF
    for data in (bytes(flipped), original_w[: len(original_w) // 3]):
        weights.write_bytes(data)
        with pytest.raises(AutoPruneError, match=r"(?i)checksum|sha"):
            load_module(out)
    weights.write_bytes(original_w)
    for text in (original_a[: len(original_a) // 2], original_a.replace("torch.nn.ReLU", "os.system"), "[]"):
        arch.write_text(text)
        with pytest.raises(AutoPruneError):
            load_module(out)


def test_import_strings_come_only_from_the_users_own_input() -> None:
    meta = {"path": "x.pt", "format": "autoprune", "model_name": "os:system", "model_kwargs": {"command": "id"}}
    ds = {"num_classes": 10, "in_channels": 1}
    with pytest.raises(ConfigError, match="import string"):
        resolve_model_args(None, meta, ds, "digits")
    # The campaign passes the checkpoint's arguments only to the model the config names (never its name).
    src = (REPO / "autoprune" / "campaign.py").read_text()
    assert 'meta.get("model_name") in (None, cfg.model.name)' in src


UNSAFE = [
    (re.compile(r"(?<![\w.])eval\("), "eval("), (re.compile(r"(?<![\w.])exec\("), "exec("),
    (re.compile(r"yaml\.(load|unsafe_load|full_load)\("), "yaml.load"),
    (re.compile(r"pickle\.loads?\("), "pickle.load"),
    (re.compile(r"marshal\.loads?\("), "marshal.load"), (re.compile(r"shelve\.open\("), "shelve"),
]


def test_source_has_no_unsafe_loading_or_dynamic_code() -> None:
    files = [p for d in ("autoprune", "agents", "envs", "search_spaces") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if "weights_only=True" not in text[m.end():i]:
                problems.append(f"{path}: torch.load without weights_only=True")
        for lineno, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip().startswith(('"', "'")) or "``" in code:
                continue  # docstring prose
            for pattern, what in UNSAFE:
                if pattern.search(code):
                    problems.append(f"{path}:{lineno}: {what}: {line.strip()}")
    assert not problems, "\n".join(problems)
