"""Campaign config validation: key paths, allowed keys/values, overrides, malformed YAML, fuzzed input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune.config import CampaignConfig, apply_overrides, config_from_dict, load_config
from autoprune.errors import ConfigError
from autoprune.objectives import Budget

BASE = {"name": "c1", "model": {"name": "resnet20"}, "dataset": {"name": "cifar10"}}


def test_minimal_config_gets_defaults() -> None:
    cfg = config_from_dict(BASE)
    assert isinstance(cfg, CampaignConfig)
    assert cfg.searcher.name == "gp" and cfg.evaluator.name == "adaptive_bn"
    assert cfg.out_dir == Path("results") / "c1"


def test_overrides_are_applied_and_typed() -> None:
    cfg = config_from_dict(BASE, ["objective.budget.macs=0.5", "n_trials=7", "searcher.kwargs.foo=bar"])
    assert cfg.objective.budget.macs == 0.5
    assert cfg.n_trials == 7
    assert cfg.searcher.kwargs == {"foo": "bar"}


def test_budget_is_validated_into_the_objectives_budget() -> None:
    """One budget schema: the config's ``objective.budget`` is an :class:`autoprune.objectives.Budget`."""
    cfg = config_from_dict(BASE, ["objective.budget.macs=0.5", "objective.budget.size_bytes=2000000"])
    assert cfg.objective.budget == Budget(macs=0.5, size_bytes=2e6)
    assert config_from_dict(BASE).objective.budget == Budget()
    with pytest.raises(ConfigError, match=r"objective\.budget\.flops: unknown key") as exc:
        config_from_dict(BASE, ["objective.budget.flops=0.5"])
    assert "macs, params, size_bytes, latency_ms" in str(exc.value)
    with pytest.raises(ConfigError, match=r"objective\.budget\.params: must be > 0, got 0.0"):
        config_from_dict(BASE, ["objective.budget.params=0"])


def test_overrides_do_not_mutate_input() -> None:
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2}}


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"serchr": {}}, "serchr: unknown key. Did you mean 'searcher'?"),
        ({"n_trials": "many"}, "n_trials: expected int"),
        ({"n_trials": 0}, "n_trials: must be ≥ 1"),
        ({"n_trials": True}, "n_trials: expected int"),
        ({"model": {"name": "r", "checkpont": "x"}}, "model.checkpont: unknown key"),
        ({"export": {"finetune": "sometimes"}}, "allowed values: 'fixed' | 'infcop' | 'none'"),
        ({"objective": {"budget": {"macs": -1}}}, "objective.budget.macs: must be > 0"),
        ({"objective": {"budget": {"macs": float("nan")}}}, "not a finite number"),
        ({"search_space": {"w_bits": [1, 4]}}, "outside 2..8"),
        ({"name": "../evil"}, "cannot be used as a directory name"),
        ({"seed": 10**30}, "out of range"),
    ],
)
def test_bad_values_name_the_key_path(patch: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, **patch})
    assert fragment in str(err.value)


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"missing required key.*dataset"):
        config_from_dict({"name": "x", "model": {"name": "r"}})


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmodel: {name: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_config(p)


def test_yaml_with_python_tags_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/campaign.yaml")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = config_from_dict(BASE, ["objective.budget.macs=0.3"])
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(p) == cfg


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from([*CampaignConfig.__dataclass_fields__, "junk"]), _json, max_size=8))
def test_fuzzed_configs_fail_only_with_config_error(data: dict) -> None:
    try:
        cfg = config_from_dict({**BASE, **data})
    except ConfigError as exc:  # anything else (TypeError, KeyError, RecursionError ...) fails the test
        assert str(exc)
    else:
        assert isinstance(cfg, CampaignConfig)
