"""The form export ships a float model in (issue #21): batch norm folded, memory layout chosen by timing and
recorded in the artifact, which loads in it; the latency statistics a shared machine cannot bend.

Nothing here asserts which layout is faster (the machine is shared): only that the choice is one of the two,
made from the recorded timings, and that every layout computes the same function.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprune import graph, pruning, serialize
from autoprune.deploy import (
    CHANNELS_LAST_MARGIN,
    LARGE_BATCH,
    choose_memory_format,
    deployable,
    memory_format_summary,
    to_memory_format,
)
from autoprune.errors import CheckpointError, ConfigError
from autoprune.latency import _summary, compare_latency
from autoprune.models import build_model


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("resnet20").eval(), torch.rand(2, 3, 32, 32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_layout_is_recorded_in_the_artifact_and_loaded_in_it(layout: str, tmp_path: Path) -> None:
    model, x = _net()
    gs = graph.analyze(model, x[:1])
    pruned = pruning.apply(model, gs, {g: max(1, gs[g].size // 2 + 1) for g in gs.prunable_ids})
    shipped, info = deployable(pruned, x[:1], memory_format=layout)
    assert info == {"bn_folded": True, "memory_format": layout}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in shipped.modules())
    assert serialize.memory_format_of(shipped) == layout
    serialize.save_module(shipped, tmp_path, x[:1])
    doc = json.loads((tmp_path / serialize.ARCH_FILE).read_text())
    assert doc.get("memory_format", "contiguous") == layout
    loaded = serialize.load_module(tmp_path)
    assert serialize.memory_format_of(loaded) == layout
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=1e-4, atol=1e-4)


def test_an_unknown_recorded_layout_is_refused(tmp_path: Path) -> None:
    model, x = _net()
    serialize.save_module(to_memory_format(deployable(model, x[:1], memory_format="contiguous")[0],
                                           "channels_last"), tmp_path, x[:1])
    path = tmp_path / serialize.ARCH_FILE
    doc = json.loads(path.read_text())
    doc["memory_format"] = "preserve"
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="memory_format"):
        serialize.load_module(tmp_path)


def test_auto_times_both_layouts_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _net()
    layout, info = choose_memory_format(deployable(model, x[:1], memory_format="contiguous")[0], x[:1],
                                        rounds=1, min_run_time=0.002)
    geo = info["geometric_mean_ms"]
    assert info["timed"] and layout == info["chosen"]
    assert layout == ("channels_last" if geo["channels_last"] < (1 - CHANNELS_LAST_MARGIN) * geo["contiguous"]
                      else "contiguous")
    assert set(info["ms"]) == {"contiguous", "channels_last"}
    assert all(set(v) == {"batch1", f"batch{LARGE_BATCH}"} for v in info["ms"].values())
    assert layout in memory_format_summary({"memory_format": layout, "memory_format_timing": info})

    # planted timings decide: the choice follows them, not a fixed preference
    from autoprune import latency

    def planted(models: dict, x: torch.Tensor, **_: object) -> dict:
        slow = "contiguous" if x.shape[0] == 1 else "channels_last"  # contiguous 3× slower at batch 1 only
        return {k: latency.LatencyResult(1.0, 0.0, 1, 1, int(x.shape[0]), (), 3.0 if k == slow and
                                         x.shape[0] == 1 else 1.0 + (k == slow)) for k in models}

    monkeypatch.setattr(latency, "compare_latency", planted)
    assert choose_memory_format(model, x[:1])[0] == "channels_last"  # √(3·1) > √(1·2)

    def close(models: dict, x: torch.Tensor, **_: object) -> dict:  # channels_last 2 % faster: within the margin
        return {k: latency.LatencyResult(1.0, 0.0, 1, 1, int(x.shape[0]), (), 0.98 if k == "channels_last" else 1.0)
                for k in models}

    monkeypatch.setattr(latency, "compare_latency", close)
    assert CHANNELS_LAST_MARGIN > 0.02 and choose_memory_format(model, x[:1])[0] == "contiguous"


def test_a_model_without_convolutions_stays_contiguous_untimed() -> None:
    mlp = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    layout, info = choose_memory_format(mlp, torch.rand(1, 8))
    assert layout == "contiguous" and not info["timed"]
    assert deployable(mlp, torch.rand(1, 8))[1]["memory_format"] == "contiguous"


def test_a_bad_layout_name_is_a_config_error() -> None:
    model, x = _net()
    with pytest.raises(ConfigError, match="unknown memory format"):
        deployable(model, x[:1], memory_format="nhwc")
    with pytest.raises(ConfigError, match="concrete layout"):
        to_memory_format(model, "auto")


def test_the_low_quantile_ignores_what_other_load_adds() -> None:
    times = [0.001] * 9 + [0.002] * 11  # 20 runs, 55 % of them slowed twofold by another process
    median, _, low = _summary(times)
    assert median == pytest.approx(2.0) and low == pytest.approx(1.0)
    assert _summary([0.003, 0.001])[2] == pytest.approx(1.0)  # fewer than ten runs: the smallest
    res = compare_latency({"m": nn.Conv2d(3, 4, 3)}, torch.rand(1, 3, 8, 8), rounds=2, min_run_time=0.002)
    assert 0 < res["m"].low_ms <= res["m"].median_ms
