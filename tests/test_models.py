"""Model zoo: every registered model builds, runs, traces with torch.fx and is deterministic; ResNet details."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from autoprune._imports import is_available
from autoprune.errors import AutoPruneError, ConfigError
from autoprune.models import MODELS, BasicBlock, CifarResNet, Normalize, build_model
from autoprune.models.checkpoint import load_checkpoint
from autoprune.models.external import ExternalModel

# (in_channels, height/width) each model is exercised with; small_cnn also covers 28×28 MNIST below.
INPUTS = {name: (3, 32) for name in MODELS.names()} | {"small_cnn": (1, 8)}
SLOW_TO_RUN = {"resnet110", "resnet110_b", "vgg19_bn"}  # forward still checked, but with batch 1


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # These tests run tiny batches; one intra-op thread avoids spin contention on busy (CI) machines.
    torch.set_num_threads(1)


def _example(name: str, batch: int = 2) -> torch.Tensor:
    channels, size = INPUTS[name]
    return torch.rand(batch, channels, size, size)


@pytest.mark.parametrize("name", MODELS.names())
def test_model_builds_runs_and_traces(name: str) -> None:
    channels, _ = INPUTS[name]
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    x = _example(name, 1 if name in SLOW_TO_RUN else 2)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (x.shape[0], 7)
    assert torch.isfinite(y).all()
    assert isinstance(model.normalize, Normalize)
    assert next(iter(model.named_children()))[0] == "normalize"
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS.names())
def test_model_is_deterministic(name: str) -> None:
    channels, _ = INPUTS[name]
    torch.manual_seed(3)
    a = build_model(name, in_channels=channels)
    torch.manual_seed(3)
    b = build_model(name, in_channels=channels)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if name not in SLOW_TO_RUN:
        x = _example(name)
        a.eval()
        with torch.no_grad():
            assert torch.equal(a(x), a(x))


@pytest.mark.parametrize("name", MODELS.names())
def test_normalize_buffers_are_persistent_not_parameters(name: str) -> None:
    channels, _ = INPUTS[name]
    model = build_model(name, in_channels=channels, mean=[0.1] * channels, std=[0.2] * channels)
    params = dict(model.named_parameters())
    state = model.state_dict()
    assert "normalize.mean" not in params and "normalize.std" not in params
    assert state["normalize.mean"].shape == (channels, 1, 1)
    torch.testing.assert_close(state["normalize.std"], torch.full((channels, 1, 1), 0.2))


def test_normalize_computes_per_channel_standardisation() -> None:
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0], channels=3)
    x = torch.ones(1, 3, 2, 2)
    out = norm(x)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    assert list(norm.parameters()) == [] and list(norm.children()) == []


def test_normalize_defaults_and_validation() -> None:
    model = build_model("resnet20")
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.full((3,), 0.5))
    with pytest.raises(ConfigError, match="3 input channels"):
        build_model("resnet20", mean=[0.1, 0.2])
    with pytest.raises(ConfigError, match="positive"):
        build_model("resnet20", std=[0.1, 0.0, 0.1])


def test_resnet20_parameter_count_matches_akamaster() -> None:
    model = build_model("resnet20")
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert sum(p.numel() for p in build_model("resnet56").parameters()) == 853_018
    # option B adds a 1×1 conv + BN at the two stage transitions: 16·32 + 64 + 32·64 + 128 = 2,752
    assert sum(p.numel() for p in build_model("resnet20_b").parameters()) == 269_722 + 2_752


def test_resnet20_parameter_count_equals_checkpoint_tensors(weights_dir: Path) -> None:
    raw = torch.load(weights_dir / "resnet20-12fca82f.th", map_location="cpu", weights_only=True)
    trainable = sum(v.numel() for k, v in raw["state_dict"].items() if "running_" not in k)
    assert trainable == sum(p.numel() for p in build_model("resnet20").parameters())


@pytest.mark.parametrize("depth", [20, 56])
def test_option_a_loads_akamaster_weights_exactly(weights_dir: Path, depth: int) -> None:
    path = next(weights_dir.glob(f"resnet{depth}-*.th"))
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = build_model(f"resnet{depth}")
    stripped = {k.removeprefix("module."): v for k, v in raw.items()}
    result = model.load_state_dict(stripped, strict=False)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if not k.startswith("normalize.")] == []
    meta = load_checkpoint(model, path)
    assert meta["missing"] == [] and meta["unexpected"] == []
    assert torch.equal(model.linear.weight, raw["module.linear.weight"])


def test_resnet_structure_and_shortcuts() -> None:
    a = build_model("resnet20")
    names = [n for n, _ in a.named_children()]
    assert names == ["normalize", "conv1", "bn1", "layer1", "layer2", "layer3", "linear"]
    assert [len(getattr(a, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    block = a.layer2[0]
    assert isinstance(block, BasicBlock) and block.shortcut is None
    assert (block.pad_left, block.pad_right) == (8, 8)
    b = build_model("resnet20_b")
    assert isinstance(b.layer2[0].shortcut[0], nn.Conv2d) and isinstance(b.layer2[0].shortcut[1], nn.BatchNorm2d)
    assert b.layer1[0].shortcut is None
    assert [len(build_model(f"resnet{d}").layer1) for d in (32, 44, 56, 110)] == [5, 7, 9, 18]


def test_option_a_shortcut_is_subsample_plus_channel_zero_pad() -> None:
    block = BasicBlock(4, 8, stride=2, option="A").eval()
    for m in (block.bn1, block.bn2):  # make the residual branch output exactly zero
        nn.init.zeros_(m.weight)
    x = torch.randn(1, 4, 6, 6)
    out = block(x)
    expected = torch.zeros(1, 8, 3, 3)
    expected[:, 2:6] = x[:, :, ::2, ::2]
    torch.testing.assert_close(out, torch.relu(expected))
    ops = {n.target for n in torch.fx.symbolic_trace(block).graph.nodes if n.op == "call_function"}
    assert torch.nn.functional.pad in ops


def test_option_a_traced_graph_has_no_opaque_modules() -> None:
    gm = torch.fx.symbolic_trace(build_model("resnet20"))
    module_types = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert module_types <= {nn.Conv2d, nn.BatchNorm2d, nn.Linear}


def test_small_cnn_handles_mnist_and_colour_inputs() -> None:
    for channels, size in [(1, 28), (3, 32), (1, 3)]:
        model = build_model("small_cnn", in_channels=channels).eval()
        assert model(torch.rand(2, channels, size, size)).shape == (2, 10)


def test_mobilenetv2_final_feature_map_is_4x4() -> None:
    model = build_model("mobilenetv2").eval()
    feats = model.features(model.normalize(torch.rand(1, 3, 32, 32)))
    assert feats.shape == (1, 1280, 4, 4)
    assert model.features[0][0].stride == (1, 1)


def test_vgg_has_512_features_before_classifier() -> None:
    for name in ("vgg11_bn", "vgg16_bn", "vgg19_bn"):
        model = build_model(name, num_classes=100)
        assert model.classifier.in_features == 512 and model.classifier.out_features == 100


def test_unknown_model_suggests_close_match() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("resnet200")
    assert "resnet20" in str(info.value) and "Choices" in str(info.value)


def test_bad_model_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="options"):
        build_model("resnet20", widht_mult=2)
    with pytest.raises(ConfigError, match="6n\\+2"):
        CifarResNet(depth=21)
    with pytest.raises(ConfigError, match="width_mult"):
        build_model("mobilenetv2", width_mult=0)
    with pytest.raises(ConfigError, match="bad option values"):  # torch's ValueError from a layer constructor
        build_model("small_cnn", width=2.5)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    src = textwrap.dedent(
        """
        import torch.nn as nn

        def build(num_classes=10, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

        def not_a_model():
            return 42

        NUMBER = 3
        """
    )
    (tmp_path / "ap_user_models.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ap_user_models"
    sys.modules.pop("ap_user_models", None)


def test_import_string_builds_wrapped_user_model(user_module: str) -> None:
    model = build_model(f"{user_module}:build", num_classes=5, hidden=6, mean=[0.2] * 3, std=[0.3] * 3)
    assert isinstance(model, ExternalModel)
    assert model(torch.rand(2, 3, 4, 4)).shape == (2, 5)
    assert model.net[1].out_features == 6
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.full((3,), 0.2))
    torch.fx.symbolic_trace(model)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ap_no_such_module_xyz:build", "cannot be imported"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:not_a_model", "not a torch.nn.Module"),
        ("{mod}:NUMBER", "not callable"),
        ("{mod}:", "malformed"),
    ],
)
def test_import_string_errors_are_clear(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(spec.format(mod=user_module))


def test_import_string_bad_kwargs(user_module: str) -> None:
    with pytest.raises(ConfigError, match="calling"):
        build_model(f"{user_module}:build", depth=3)


@pytest.mark.skipif(is_available("torchvision"), reason="torchvision is importable here")
def test_torchvision_missing_gives_clear_error() -> None:
    with pytest.raises(AutoPruneError) as info:
        build_model("torchvision:resnet18")
    text = str(info.value)
    assert "torchvision" in text and "cannot be imported" in text
    assert info.value.hint is not None and "vision" in info.value.hint


@pytest.mark.skipif(not is_available("torchvision"), reason="torchvision is not importable here")
def test_torchvision_model_builds_when_available() -> None:
    model = build_model("torchvision:resnet18", num_classes=10)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match="no model"):
        build_model("torchvision:resnet_does_not_exist")
