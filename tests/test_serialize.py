"""Architecture-as-data round trips (ENGINE.md §4, §9 property R) and refusal of unsafe or corrupt files."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from autoprune import serialize
from autoprune._imports import is_available
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError

# --------------------------------------------------------------------------- inline models


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)
            m.running_mean = torch.randn(m.num_features, generator=g)
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model


class ConvNet(nn.Module):
    """conv/BN/ReLU, residual add, chunk, cat, F.pad, slicing, adaptive pool, view, mean, flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(12 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y) + y
        a, b = z.chunk(2, 1)
        shortcut = F.pad(y[:, ::2, ::2, ::2], (0, 0, 0, 0, 2, 2))
        z = torch.cat([a, b, F.interpolate(shortcut, scale_factor=2.0)[:, 2:6, ...]], dim=1)
        z = self.pool(z)
        z = z.view(z.size(0), -1)
        return self.fc(z) + z.mean(1, keepdim=True)


class OptionAResNet(nn.Module):
    """Tiny option-A ResNet (zero-pad shortcut with a lambda-free F.pad, in-place add, Sequential body)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(8))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        out = self.layer(x)
        out += F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0.0)
        out = F.relu(out)
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(self.flatten(out))


class MiscNet(nn.Module):
    """Depthwise/grouped conv, norms, activations, pools, softmax, transpose/permute/reshape and a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.gconv = nn.Conv2d(4, 8, 1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.Hardswish()
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2, ceil_mode=True)
        self.ln = nn.LayerNorm(8)
        self.gelu = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)
        self.soft = nn.Softmax(dim=-1)
        self.register_buffer("offset", torch.linspace(-1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.gn(self.gconv(torch.sigmoid(self.dw(x)))))
        x = self.avg(self.pool(x))
        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1).reshape(b, h * w, c) + self.offset
        t = self.drop(self.gelu(self.ln(t)))
        t = t.transpose(1, 2).mean(dim=-1)
        return self.soft(self.head(t.to(torch.float32).contiguous()))


class SeqNet(nn.Module):
    """Embedding with a weight tied to the output projection, LayerNorm and MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(self.norm(h + a))


def _trace(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(_randomize_bn(model).eval())


CASES = [
    ("convnet", ConvNet, lambda: torch.randn(2, 3, 8, 8)),
    ("option_a", OptionAResNet, lambda: torch.randn(2, 3, 8, 8)),
    ("misc", MiscNet, lambda: torch.randn(2, 4, 8, 8)),
    ("seq", SeqNet, lambda: torch.randint(0, 20, (2, 5))),
]


@pytest.mark.parametrize(("name", "factory", "make_input"), CASES, ids=[c[0] for c in CASES])
def test_round_trip_identical(tmp_path: Path, name: str, factory, make_input) -> None:
    gm = _trace(factory())
    x = make_input()
    out_dir = serialize.save_module(gm, tmp_path / name, x, metadata={"groups": {"g0": {"size": 8, "width": 4}}})
    loaded = serialize.load_module(out_dir)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    assert list(loaded.state_dict()) == list(gm.state_dict())
    assert loaded.meta["autoprune"]["metadata"] == {"groups": {"g0": {"size": 8, "width": 4}}}
    assert loaded.meta["autoprune"]["example_input"]["shape"] == list(x.shape)
    assert not loaded.training


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    gm = _trace(SeqNet())
    serialize.save_module(gm, tmp_path, torch.zeros(1, 3, dtype=torch.long))
    loaded = serialize.load_module(tmp_path)
    assert loaded.get_submodule("out").weight is loaded.get_submodule("emb").weight
    stored = torch.load(tmp_path / serialize.WEIGHTS_FILE, weights_only=True)
    assert "out.weight" not in stored and "emb.weight" in stored


def test_training_flags_and_trainability(tmp_path: Path) -> None:
    gm = _trace(ConvNet()).train()
    gm.get_submodule("bn1").eval()
    x = torch.randn(4, 3, 8, 8)
    serialize.save_module(gm, tmp_path, x)
    loaded = serialize.load_module(tmp_path)
    assert loaded.training and not loaded.get_submodule("bn1").training and loaded.get_submodule("conv2").training
    loaded(x).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_plain_module_is_traced(tmp_path: Path) -> None:
    model = _randomize_bn(OptionAResNet()).eval()
    x = torch.randn(1, 3, 8, 8)
    serialize.save_module(model, tmp_path, x)
    with torch.no_grad():
        assert torch.equal(serialize.load_module(tmp_path)(x), model(x))


def test_literals_round_trip() -> None:
    g = fx.Graph()
    x = g.placeholder("x")
    literal = (slice(1, None, 2), Ellipsis, None, torch.Size([2, 3]), torch.float16, torch.device("cpu"),
               torch.channels_last, [1, 2.5, "s", True], {"k": 1, 3: (float("inf"), -0.0)}, 1 + 2j, x)
    encoded = json.loads(json.dumps(serialize._encode_arg(literal), allow_nan=False))
    decoded = serialize._decode_arg(encoded, {"x": x})
    assert decoded[:6] == literal[:6] and decoded[6] is torch.channels_last
    assert decoded[7] == [1, 2.5, "s", True] and isinstance(decoded[7][1], float) and decoded[7][3] is True
    assert decoded[8] == {"k": 1, 3: (float("inf"), -0.0)} and decoded[9] == 1 + 2j and decoded[10] is x


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, fx.GraphModule]:
    gm = _trace(ConvNet())
    serialize.save_module(gm, tmp_path, torch.randn(1, 3, 8, 8))
    return tmp_path, gm


def _rewrite_arch(path: Path, edit) -> None:
    doc = json.loads((path / serialize.ARCH_FILE).read_text())
    edit(doc)
    (path / serialize.ARCH_FILE).write_text(json.dumps(doc))


def _set_sha(path: Path) -> None:
    blob = (path / serialize.WEIGHTS_FILE).read_bytes()

    def edit(doc: dict) -> None:
        doc["manifest"][serialize.WEIGHTS_FILE] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}

    _rewrite_arch(path, edit)


def test_tampered_weights_rejected(saved) -> None:
    path, _ = saved
    blob = bytearray((path / serialize.WEIGHTS_FILE).read_bytes())
    blob[-200] ^= 0x01
    (path / serialize.WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        serialize.load_module(path)


def test_truncated_files_rejected(saved) -> None:
    path, _ = saved
    weights = (path / serialize.WEIGHTS_FILE).read_bytes()
    (path / serialize.WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="truncated or modified"):
        serialize.load_module(path)
    _set_sha(path)  # even with a matching checksum the truncated zip cannot be read
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        serialize.load_module(path)
    text = (path / serialize.ARCH_FILE).read_text()
    (path / serialize.ARCH_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        serialize.load_module(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_rejected(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved
    monkeypatch.chdir(path)
    (path / serialize.WEIGHTS_FILE).write_bytes(pickle.dumps({"conv1.weight": _Evil()}))
    _set_sha(path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        serialize.load_module(path)
    assert not (path / "pwned_by_pickle").exists()
    buf = io.BytesIO()
    torch.save(ConvNet(), buf)  # a pickled module (needs its class) is refused as well
    (path / serialize.WEIGHTS_FILE).write_bytes(buf.getvalue())
    _set_sha(path)
    with pytest.raises(CheckpointError):
        serialize.load_module(path)


def test_unknown_function_target_refused(saved) -> None:
    path, _ = saved

    def edit(doc: dict) -> None:
        node = next(n for n in doc["graph"] if n["op"] == "call_function")
        node["target"] = "os.system"
        node["args"] = ["echo pwned"]

    _rewrite_arch(path, edit)
    with pytest.raises(CheckpointError, match=r"'os\.system'.*allow-list"):
        serialize.load_module(path)


@pytest.mark.parametrize(("op", "target", "match"), [
    ("call_method", "__class__", "not an allowed tensor method"),
    ("call_method", "apply_", "not an allowed tensor method"),
    ("call_function", "builtins.eval", "allow-list"),
    ("call_function", "torch.load", "allow-list"),
    ("call_module", "nonexistent", "does not define"),
])  # fmt: skip
def test_unsafe_targets_refused(saved, op: str, target: str, match: str) -> None:
    path, _ = saved

    def edit(doc: dict) -> None:
        node = next(n for n in doc["graph"] if n["op"] == "call_method")
        node["op"], node["target"] = op, target

    _rewrite_arch(path, edit)
    with pytest.raises(CheckpointError, match=match):
        serialize.load_module(path)


def test_getattr_restricted() -> None:
    fn = serialize._function_table()[0]["builtins.getattr"]
    assert fn(torch.zeros(2, 3), "shape") == torch.Size([2, 3])
    with pytest.raises(AttributeError):
        fn(torch.zeros(1), "__class__")


def test_unknown_module_type_and_version_refused(saved) -> None:
    path, _ = saved
    _rewrite_arch(path, lambda d: d["modules"]["conv1"].__setitem__("type", "subprocess.Popen"))
    with pytest.raises(CheckpointError, match="allow-list of loadable module types"):
        serialize.load_module(path)
    _rewrite_arch(path, lambda d: d["modules"]["conv1"].__setitem__("type", "torch.nn.Conv2d"))
    _rewrite_arch(path, lambda d: d.__setitem__("format_version", 99))
    with pytest.raises(CheckpointError, match="format version 99"):
        serialize.load_module(path)


def test_shape_mismatch_refused(saved) -> None:
    path, _ = saved
    _rewrite_arch(path, lambda d: d["modules"]["conv2"]["kwargs"].__setitem__("out_channels", 4))
    with pytest.raises(CheckpointError, match="does not fit the module"):
        serialize.load_module(path)


def test_missing_directory_and_weights(tmp_path: Path, saved) -> None:
    with pytest.raises(CheckpointError, match=r"no arch\.json"):
        serialize.load_module(tmp_path / "nope")
    path, _ = saved
    (path / serialize.WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no weights\.pt"):
        serialize.load_module(path)


class _CustomBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class _Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_unsupported_module_type_refused_on_save(tmp_path: Path) -> None:
    class MyConv(nn.Conv2d):  # a subclass may override forward: refused, not silently stored as Conv2d
        pass

    model = _Unsupported()
    model.block = MyConv(1, 1, 1)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, MyConv) or super().is_leaf_module(m, qualname)

    gm = fx.GraphModule(model, Tracer().trace(model))
    with pytest.raises(CheckpointError, match="not in the allow-list"):
        serialize.save_module(gm, tmp_path, torch.zeros(1, 1, 2, 2))


def test_bad_metadata_and_example(tmp_path: Path) -> None:
    gm = _trace(ConvNet())
    with pytest.raises(ConfigError, match="JSON"):
        serialize.save_module(gm, tmp_path, torch.zeros(1, 3, 8, 8), metadata={"x": object()})
    with pytest.raises(ConfigError, match="example_input"):
        serialize.save_module(gm, tmp_path, "not a tensor")


# --------------------------------------------------------------------------- deployment export


def test_export_pt2_round_trip(tmp_path: Path) -> None:
    gm = _trace(OptionAResNet())
    x = torch.randn(2, 3, 8, 8)
    paths = serialize.export_deployment(gm, x, tmp_path, formats=("pt2",))
    program = torch.export.load(str(paths["pt2"]))
    with torch.no_grad():
        assert torch.equal(program.module()(x), gm(x))
    with pytest.raises(ConfigError, match="unknown export format"):
        serialize.export_deployment(gm, x, tmp_path, formats=("tflite",))


@pytest.mark.parametrize("example_batch", [1, 3])
def test_pt2_export_runs_at_any_batch(tmp_path: Path, example_batch: int) -> None:
    gm = _trace(OptionAResNet()).eval()
    paths = serialize.export_deployment(gm, torch.randn(example_batch, 3, 8, 8), tmp_path, formats=("pt2",))
    program = torch.export.load(str(paths["pt2"])).module()
    for batch in (1, 7):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            assert torch.allclose(program(x), gm(x), atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_torchscript_artifact_is_frozen_and_runs_at_any_batch(tmp_path: Path, layout: str) -> None:
    from autoprune.deploy import deployable

    model = OptionAResNet().eval()
    shipped = deployable(model, torch.randn(1, 3, 8, 8), memory_format=layout)[0]
    paths = serialize.export_deployment(shipped, torch.randn(1, 3, 8, 8), tmp_path, formats=("torchscript",))
    loaded = torch.jit.load(str(paths["torchscript"]))
    assert not list(loaded.parameters())  # frozen: the weights are constants of the graph
    for batch in (1, 7):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_onnx_export_round_trips_through_onnx_runtime_at_any_batch(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install autoprune[onnx])")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install autoprune[onnx])")
    gm = _trace(OptionAResNet()).eval()
    paths = serialize.export_deployment(gm, torch.randn(1, 3, 8, 8), tmp_path, formats=("onnx",))
    check = serialize.check_onnx(paths["onnx"], gm, torch.randn(1, 3, 8, 8), batches=(1, 7))
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 and check["batches"] == [1, 7]
    assert check["latency_ms"]["onnxruntime"] > 0 and check["latency_ms"]["torch"] > 0


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).view(2, -1)  # the batch size is written into the code


def test_pt2_export_of_a_fixed_batch_model_keeps_its_batch_and_says_so(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    model, x = _FixedBatch().eval(), torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING", logger="autoprune.serialize"):
        paths = serialize.export_deployment(model, x, tmp_path, formats=("pt2",))
    assert "fixes its batch size" in caplog.text and "batch 2 only" in caplog.text
    with torch.no_grad():
        assert torch.equal(torch.export.load(str(paths["pt2"])).module()(x), model(x))


# --------------------------------------------------------------------------- zoo models (when present)


FAST_ZOO = ("resnet20", "resnet20_b", "vgg11_bn", "mobilenetv2")


def _zoo_params() -> list:
    if not is_available("autoprune.models"):
        return [pytest.param("none", marks=pytest.mark.skip(reason="model zoo not available yet"))]
    from autoprune import models

    names = [n for n in models.MODELS.names() if n != "small_cnn"]
    return [n if n in FAST_ZOO else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_round_trip(tmp_path: Path, name: str) -> None:
    from autoprune import models

    torch.manual_seed(0)
    model = _randomize_bn(models.build_model(name)).eval()
    x = torch.rand(1, 3, 32, 32)
    serialize.save_module(serialize.trace(copy.deepcopy(model)), tmp_path, x)
    loaded = serialize.load_module(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_small_cnn_round_trip(tmp_path: Path) -> None:
    if not is_available("autoprune.models"):
        pytest.skip("model zoo not available yet")
    from autoprune import models

    if "small_cnn" not in models.MODELS.names():
        pytest.skip("small_cnn not registered")
    model = models.build_model("small_cnn", in_channels=1).eval()
    assert model.normalize.mean.shape == (1, 1, 1)
    for shape in ((2, 1, 8, 8), (2, 1, 28, 28)):
        x = torch.rand(*shape)
        try:
            with torch.no_grad():
                ref = model(x)
        except RuntimeError:
            continue
        serialize.save_module(model, tmp_path, x)
        loaded = serialize.load_module(tmp_path)
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
        assert loaded.get_submodule("normalize").mean.shape == (1, 1, 1) if "normalize" in dict(
            loaded.named_modules()) else loaded.normalize.mean.shape == (1, 1, 1)
        return
    pytest.skip("small_cnn accepts neither 8×8 nor 28×28 input")


def test_pruned_graph_module_round_trip(tmp_path: Path) -> None:
    if not (is_available("autoprune.pruning") and is_available("autoprune.graph") and
            is_available("autoprune.models")):
        pytest.skip("pruning engine not available yet")
    from autoprune import graph, models, pruning

    model = _randomize_bn(models.build_model("resnet20")).eval()
    x = torch.rand(1, 3, 32, 32)
    groups = graph.analyze(model, x)
    widths = {g.id: max(1, g.size // 2) for g in groups.prunable()}
    small = pruning.apply(model, groups, widths)
    serialize.save_module(small, tmp_path, x)
    loaded = serialize.load_module(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_error_is_autoprune_error() -> None:
    assert issubclass(CheckpointError, AutoPruneError)


# --------------------------------------------------------------------------- extension hooks


class _Scale(nn.Module):
    """A module type outside the built-in allow-list, registered by the test like quantization registers QConv2d."""

    def __init__(self, factor: float = 1.0, channels: int = 1) -> None:
        super().__init__()
        self.factor, self.channels = factor, channels
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # data-dependent control flow: torch.fx can only keep this module as a (registered) leaf
            raise ValueError("expected NCHW input")
        return x * self.weight.view(1, -1, 1, 1) * self.factor


class _ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.scale = _Scale(0.5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x))


def test_registered_module_type_round_trips(tmp_path: Path) -> None:
    model = _ScaleNet().eval()
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(AutoPruneError, match="cannot trace"):
        serialize.save_module(model, tmp_path / "before", x)
    name = serialize.register_module_type(_Scale, lambda m: {"factor": m.factor, "channels": m.channels})
    assert name == f"{__name__}._Scale" and name in serialize.supported_module_types()
    assert serialize.encode_kwargs(model.scale) == {"factor": 0.5, "channels": 4}
    assert serialize.decode_kwargs(serialize.encode_kwargs(model.conv))["kernel_size"] == (1, 1)
    with torch.no_grad():
        model.scale.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    serialize.save_module(model, tmp_path / "after", x)
    loaded = serialize.load_module(tmp_path / "after")
    assert type(loaded.scale) is _Scale
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_register_refuses_builtins_and_non_modules() -> None:
    with pytest.raises(ConfigError, match="built-in"):
        serialize.register_module_type(nn.Conv2d, lambda m: {})
    with pytest.raises(ConfigError, match=r"nn\.Module subclass"):
        serialize.register_module_type(int, lambda m: {})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="extension section"):
        serialize.register_section("modules", lambda arch, tensors: fx.GraphModule(nn.Module(), fx.Graph()))
    with pytest.raises(CheckpointError, match=r"allow-listed module type \(as 'torch.nn.Linear'\)"):
        serialize.encode_kwargs(nn.Conv2d(1, 1, 1), "torch.nn.Linear")


def test_registered_section_dispatches_load(tmp_path: Path) -> None:
    gm = _trace(ConvNet())
    x = torch.randn(2, 3, 8, 8)
    calls: list[dict] = []

    def loader(arch, tensors) -> fx.GraphModule:
        calls.append(dict(arch["test_extension"]))
        return serialize.build_module(arch, tensors)

    serialize.register_section("test_extension", loader)
    arch, tensors = serialize.encode_module(gm)
    serialize.write_artifact(tmp_path, {**arch, "test_extension": {"version": 1}}, tensors, x)
    with torch.no_grad():
        assert torch.equal(serialize.load_module(tmp_path)(x), gm(x))
    assert calls == [{"version": 1}]
    _rewrite_arch(tmp_path, lambda d: d.__setitem__("quant", {"version": 1}))
    with pytest.raises(CheckpointError, match="several extension sections"):
        serialize.load_module(tmp_path)


_FRESH_PROCESS = """
import sys
import torch
from autoprune.serialize import load_module
assert "autoprune.quantization" not in sys.modules, "serialize imported quantization"
root = sys.argv[1]
x, expected = torch.load(root + "/io.pt")
for sub in ("packed", "fake"):
    with torch.no_grad():
        out = load_module(root + "/" + sub)(x)
    assert torch.equal(out, expected[sub]), sub
print("ok", type(load_module(root + "/packed").get_submodule("conv2")).__name__)
"""


def test_quantized_artifacts_load_in_a_fresh_process(tmp_path: Path) -> None:
    """``load_module`` alone (no quantization import) loads the packed ``quant`` section and live Q-layers."""
    import subprocess
    import sys

    from autoprune import quantization

    gm = _trace(ConvNet())
    x = torch.randn(2, 3, 8, 8)
    qm = quantization.apply(gm, {"conv1": (8, None), "conv2": (3, 8), "fc": (8, 8)})
    quantization.calibrate(qm, [x], batches=1)
    quantization.save_quantized(qm, tmp_path / "packed", x)  # weights as packed codes in a "quant" section
    serialize.save_module(qm, tmp_path / "fake", x)  # fake-quant layers stored as plain module types
    with torch.no_grad():
        expected = {"packed": quantization.load_quantized(tmp_path / "packed")(x), "fake": qm(x)}
    torch.save((x, expected), tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "QConv2d"]


# --------------------------------------------------------------------------- fx-wrapped functions of other libraries

_FAKE_PROVIDER = "autoprune_test_fake_provider"  # stands in for e.g. torchvision.ops.stochastic_depth


def fake_wrapped_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """An fx-wrapped function of another library (torch.fx keeps the call; serialize's table must allow it)."""
    if x.dim() < 2:  # data-dependent control flow: tracing into it would fail
        raise ValueError("expected a batch")
    return x * factor + 1.0


fake_wrapped_scale.__module__ = _FAKE_PROVIDER
torch.fx.wrap("fake_wrapped_scale")


def impostor_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Claims the listed qualified name but is not the provider's function: never saved under that name."""
    return x * factor


impostor_scale.__module__, impostor_scale.__qualname__ = _FAKE_PROVIDER, "fake_wrapped_scale"
torch.fx.wrap("impostor_scale")


class _WrappedNet(nn.Module):
    def __init__(self, impostor: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.impostor = impostor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return impostor_scale(y, 0.5) if self.impostor else fake_wrapped_scale(y, 0.5)


@pytest.fixture
def fake_provider(monkeypatch: pytest.MonkeyPatch):
    """A provider module (in sys.modules) defining ``fake_wrapped_scale``, listed in serialize's wrapped table."""
    import sys
    import types

    module = types.ModuleType(_FAKE_PROVIDER)
    module.fake_wrapped_scale = fake_wrapped_scale  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, _FAKE_PROVIDER, module)
    name = f"{_FAKE_PROVIDER}.fake_wrapped_scale"
    monkeypatch.setitem(serialize._WRAPPED_FUNCTIONS, name, _FAKE_PROVIDER)
    return name


def test_wrapped_function_round_trips(tmp_path: Path, fake_provider: str) -> None:
    model = _WrappedNet().eval()
    x = torch.randn(2, 3, 4, 4)
    serialize.save_module(model, tmp_path, x)
    nodes = serialize.read_metadata(tmp_path)["graph"]
    assert [n["target"] for n in nodes if n["op"] == "call_function"] == [fake_provider]
    loaded = serialize.load_module(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the loaded call is marked wrapped again: tracing the loaded module keeps it one call
    retraced = fx.symbolic_trace(loaded)
    assert [n.target for n in retraced.graph.nodes if n.op == "call_function"] == [fake_wrapped_scale]


def test_wrapped_function_without_its_provider_is_a_checkpoint_error(tmp_path: Path, fake_provider: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    serialize.save_module(_WrappedNet().eval(), tmp_path, torch.randn(2, 3, 4, 4))
    monkeypatch.delitem(sys.modules, _FAKE_PROVIDER)  # the machine that loads lacks the package
    with pytest.raises(CheckpointError, match=rf"calls {fake_provider}, but {_FAKE_PROVIDER} cannot be imported") \
            as err:
        serialize.load_module(tmp_path)
    assert err.value.hint is not None and f"install the `{_FAKE_PROVIDER}` package" in err.value.hint
    module = type(sys)(_FAKE_PROVIDER)  # importable, but without the function: refused as well
    monkeypatch.setitem(sys.modules, _FAKE_PROVIDER, module)
    with pytest.raises(CheckpointError, match="does not define"):
        serialize.load_module(tmp_path)


def test_wrapped_function_impostor_and_unlisted_names_refused(tmp_path: Path, fake_provider: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    x = torch.randn(2, 3, 4, 4)
    # same qualified name as the listed function, but not the provider's object: not saved under that name
    with pytest.raises(CheckpointError, match="allow-list of functions"):
        serialize.save_module(_WrappedNet(impostor=True).eval(), tmp_path / "impostor", x)
    # unlisted while saving: refused
    monkeypatch.delitem(serialize._WRAPPED_FUNCTIONS, fake_provider)
    with pytest.raises(CheckpointError, match="allow-list of functions"):
        serialize.save_module(_WrappedNet().eval(), tmp_path / "unlisted", x)
    monkeypatch.setitem(serialize._WRAPPED_FUNCTIONS, fake_provider, _FAKE_PROVIDER)
    serialize.save_module(_WrappedNet().eval(), tmp_path / "ok", x)
    # a file naming an importable module that is not in the table: refused, and the module is never imported
    marker = tmp_path / "imported"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "autoprune_test_not_listed.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef fake_wrapped_scale(x, f):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))

    def edit(doc: dict) -> None:
        node = next(n for n in doc["graph"] if n["op"] == "call_function")
        node["target"] = "autoprune_test_not_listed.fake_wrapped_scale"

    _rewrite_arch(tmp_path / "ok", edit)
    with pytest.raises(CheckpointError, match="allow-list of functions"):
        serialize.load_module(tmp_path / "ok")
    assert not marker.exists() and "autoprune_test_not_listed" not in sys.modules


@pytest.mark.skipif(is_available("torchvision"), reason="checks the message where torchvision cannot be imported")
def test_torchvision_function_without_torchvision_gives_the_install_hint(saved) -> None:
    path, _ = saved

    def edit(doc: dict) -> None:
        node = next(n for n in doc["graph"] if n["op"] == "call_function")
        node["target"] = "torchvision.ops.stochastic_depth.stochastic_depth"

    _rewrite_arch(path, edit)
    with pytest.raises(CheckpointError, match=r"torchvision\.ops\.stochastic_depth cannot be imported here") as err:
        serialize.load_module(path)
    assert err.value.hint is not None and "vision" in err.value.hint


def test_wrapped_function_table_is_qualified_names_of_their_providers() -> None:
    for name, provider in serialize._WRAPPED_FUNCTIONS.items():
        assert name.rpartition(".")[0] == provider
    assert "autoprune.graph.attention.pruned_shifted_window_attention" in serialize._WRAPPED_FUNCTIONS
