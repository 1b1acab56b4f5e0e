"""Latency harness (ENGINE.md §6.3, §9 case 25): structural checks only — no timing thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprune import latency
from autoprune._imports import is_available
from autoprune.errors import AutoPruneError, ConfigError
from autoprune.types import QuantSpec

FAST = 0.01  # seconds of timed runs per measurement


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_measure_latency_structure_and_restores_state() -> None:
    model = _model().train()
    torch.set_num_threads(2)
    res = latency.measure_latency(model, torch.rand(2, 3, 16, 16), threads=1, min_run_time=FAST, warmup=1)
    assert res.median_ms > 0 and res.iqr_ms >= 0 and res.runs >= 1
    assert res.threads == 1 and res.batch == 2
    assert torch.get_num_threads() == 2 and model.training
    assert json.loads(json.dumps(res.to_dict()))["median_ms"] == res.median_ms


def test_measure_latency_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="threads"):
        latency.measure_latency(_model(), torch.rand(1, 3, 8, 8), threads=0)
    with pytest.raises(ConfigError, match="min_run_time"):
        latency.measure_latency(_model(), torch.rand(1, 3, 8, 8), min_run_time=0)
    torch.set_num_threads(2)
    with pytest.raises(AutoPruneError, match="example input"):
        latency.measure_latency(_model(), torch.rand(1, 5, 8, 8), min_run_time=FAST)
    assert torch.get_num_threads() == 2


def test_compare_latency_interleaves_rounds() -> None:
    calls: list[str] = []

    class Tagged(nn.Module):
        def __init__(self, tag: str, width: int) -> None:
            super().__init__()
            self.tag, self.body = tag, nn.Conv2d(3, width, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not calls or calls[-1] != self.tag:
                calls.append(self.tag)
            return self.body(x)

    models = {"a": Tagged("a", 4), "b": Tagged("b", 16)}
    out = latency.compare_latency(models, torch.rand(1, 3, 16, 16), rounds=2, min_run_time=FAST, warmup=1)
    assert set(out) == {"a", "b"}
    assert all(r.median_ms > 0 and r.iqr_ms >= 0 and len(r.rounds_ms) == 2 for r in out.values())
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-up, then A B A B
    with pytest.raises(ConfigError):
        latency.compare_latency({}, torch.rand(1, 3, 8, 8))


def test_latency_table_caches_and_persists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lut.json"
    table = latency.LatencyTable(path, min_run_time=FAST)
    first = table.lookup("conv", 8, 8, 3, 1, 8, 8)
    assert first > 0 and (table.hits, table.misses) == (0, 1)
    assert table.lookup("conv", 8, 8, 3, 1, 8, 8) == first and (table.hits, table.misses) == (1, 1)
    assert table.key("conv", 8, 8, bits=4) == table.key("conv", 8, 8, bits=8)  # sub-8-bit timed as int8
    assert str(table.key("linear", 4, 2)) == "linear|4|2|1|1|1|1|1|32"
    table.save()
    reloaded = latency.LatencyTable(path, min_run_time=FAST)

    def boom(self, key):  # a cache hit must not measure again
        raise AssertionError(f"measured {key}")

    monkeypatch.setattr(latency.LatencyTable, "_measure", boom)
    assert reloaded.lookup("conv", 8, 8, 3, 1, 8, 8) == first and reloaded.hits == 1
    with pytest.raises(ConfigError, match="threads=1"):
        latency.LatencyTable(path, threads=2)


def test_latency_table_estimate_sums_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[latency.LayerKey] = []

    def fake(self, key):
        seen.append(key)
        return 1.0 + key.c_out

    monkeypatch.setattr(latency.LatencyTable, "_measure", fake)
    table = latency.LatencyTable(min_run_time=FAST)
    model = _model()
    total = table.estimate(model, torch.rand(1, 3, 16, 16), bits={"2": QuantSpec(4, 8)})
    assert total == (1 + 8) + (1 + 8) + (1 + 4)
    assert [k.op for k in seen] == ["conv", "conv", "linear"]
    assert seen[0].h == 16 and seen[1].bits == 8 and seen[1].stride == 2 and seen[0].bits == 32
    with pytest.raises(ConfigError, match="unknown layer op"):
        table.lookup("attention", 4, 4)


def test_corrupt_table_refused(tmp_path: Path) -> None:
    path = tmp_path / "lut.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read latency table"):
        latency.LatencyTable(path)


@pytest.mark.skipif(not is_available("torch.ao.nn.quantized"), reason="torch.ao quantized modules missing")
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao quantized tensors are deprecated upstream
def test_int8_layer_entry() -> None:
    table = latency.LatencyTable(min_run_time=FAST)
    try:
        ms = table.lookup("conv", 8, 8, 3, 1, 8, 8, bits=8)
    except AutoPruneError as exc:
        pytest.skip(f"no int8 engine: {exc}")
    assert ms > 0 and table.lookup("linear", 16, 8, bits=8) > 0
