"""Every torchvision classifier through the engine (issue #22), as a user would prune it.

For each model of ``torchvision.models.list_models(module=torchvision.models)``, built with ``weights=None`` in eval
mode, with BN statistics and the weights torchvision initialises to a constant perturbed
(:func:`benchmarks.bench_engine_zoo.perturb`), the pipeline of :func:`benchmarks.bench_engine_zoo.measure` runs
once: ``graph.analyze``, every prunable group at 50 % of its width with L1 importance (``pruning.plan`` +
``pruning.apply``), and the checks below, one test id each:

* ``prune``: analyse, apply and a forward of the pruned model succeed with the original output shapes;
* ``equivalent``: the pruned model equals the masked original (``tests/engine_cases.masked_reference``) within
  ``1e-5 · max(1, max|output|)``, on the whole plan. Where a LayerNorm normalises over pruned channels
  (``bench_engine_zoo.inexact_norms``: ConvNeXt's, the ViTs' and Swin's streams) removing a channel is not zeroing
  it (ENGINE.md §2.4): there the masked original's LayerNorm normalises over the kept channels only
  (``bench_engine_zoo.masked_layer_norms``);
* ``macs_dense`` / ``macs_pruned``: the closed-form MACs (``cost.closed_form``) equal the counted MACs of the
  dense / pruned model (``bench_engine_zoo.reference_macs``: ``FlopCounterMode`` with attention counted);
* ``unchanged``: analyse and apply left the model passed in as it was (state dict, module attributes, output).

A check that fails today because the engine lacks a rule is listed in :data:`EXPECTED_FAILURES` (model → check →
reason) and runs as a strict expected failure: when a fix makes it pass, the test fails until the entry is
removed. Nothing is skipped silently.

Inputs and configurations (to fit the CI budget of 8 minutes on 2 cores): batch 1 at :data:`SIDE` × :data:`SIDE`
(32) for the CNNs; AlexNet at 64 (its three max-pools need it), Inception-v3 at 75 (its minimum), Swin and Swin-V2
at 64; the ViTs are built with ``image_size`` 32 (28 for ViT-H/14, patch 14). Reduced configurations (same
classes and block structure, fewer blocks), listed in :data:`REDUCED`: ViT-L and ViT-H keep their width with 2
encoder layers; MaxViT-T is built from ``MaxVit`` at 64×64 with ``partition_size`` 2 (torchvision's ``maxvit_t``
fixes ``partition_size`` 7, which needs a 224×224 input) and one block per stage; RegNetY-128GF and RegNetY-32GF
keep their stage widths with one block per stage; ConvNeXt-B and ConvNeXt-L keep their widths with 1, 1, 3, 1
blocks per stage. Everything else is torchvision's builder as it is (the whole run takes about 4 minutes on
the 2-core CI machine).

Runs in the vision environment (``make test-vision``: torch 2.14.1 + torchvision 0.29.1); where torchvision cannot
be imported (the default environment, torch 2.13.0) the module is skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

try:
    import torchvision
    from torchvision import models as tvm
except Exception as exc:  # a torchvision built for another torch raises more than ImportError
    pytest.skip(f"torchvision cannot be imported here ({type(exc).__name__}: {exc}); the torchvision zoo test runs "
                "in the vision environment: make test-vision", allow_module_level=True)

from benchmarks import bench_engine_zoo as bz

pytestmark = pytest.mark.vision

MODELS: list[str] = list(tvm.list_models(module=tvm))
CHECKS = ("prune", "equivalent", "macs_dense", "macs_pruned", "unchanged")
#: Side of the square input of the CNNs.
SIDE = 32
#: Inputs other than SIDE × SIDE.
SIDES = {"alexnet": 64, "inception_v3": 75, "swin_t": 64, "swin_s": 64, "swin_b": 64, "swin_v2_t": 64,
         "swin_v2_s": 64, "swin_v2_b": 64, "maxvit_t": 64}
#: ViT builders take the image size as a keyword.
VIT_IMAGE = {"vit_b_16": 32, "vit_b_32": 32, "vit_l_16": 32, "vit_l_32": 32, "vit_h_14": 28}


def _vit(patch: int, layers: int, heads: int, hidden: int, mlp: int, image: int) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=image, patch_size=patch, num_layers=layers, num_heads=heads,
                             hidden_dim=hidden, mlp_dim=mlp)


def _maxvit_small() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
                  block_layers=[1, 1, 1, 1], head_dim=32, stochastic_depth_prob=0.2)


def _convnext(widths: tuple[int, int, int, int], layers: tuple[int, int, int, int]) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    outs = (*widths[1:], None)
    return ConvNeXt([CNBlockConfig(w, o, n) for w, o, n in zip(widths, outs, layers)], stochastic_depth_prob=0.5)


def _regnet(depth: int, w_0: int, w_a: float, w_m: float, group_width: int, se_ratio: float | None) -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=depth, w_0=w_0, w_a=w_a, w_m=w_m, group_width=group_width,
                                          se_ratio=se_ratio)
    one = BlockParams(depths=[1] * len(params.depths), widths=params.widths, group_widths=params.group_widths,
                      bottleneck_multipliers=params.bottleneck_multipliers, strides=params.strides,
                      se_ratio=params.se_ratio)
    return RegNet(one)


#: Reduced configurations: model → builder (see the module docstring).
REDUCED: dict[str, Callable[[], nn.Module]] = {
    "vit_l_16": lambda: _vit(16, 2, 16, 1024, 4096, 32),
    "vit_l_32": lambda: _vit(32, 2, 16, 1024, 4096, 32),
    "vit_h_14": lambda: _vit(14, 2, 16, 1280, 5120, 28),
    "maxvit_t": _maxvit_small,
    "convnext_base": lambda: _convnext((128, 256, 512, 1024), (1, 1, 3, 1)),
    "convnext_large": lambda: _convnext((192, 384, 768, 1536), (1, 1, 3, 1)),
    "regnet_y_128gf": lambda: _regnet(27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_y_32gf": lambda: _regnet(20, 232, 115.89, 2.53, 232, 0.25),
}

#: Checks that fail today for want of an engine rule: model → check → reason. A strict expected failure each, so
#: an entry must go when the rule lands. Empty: on the engine of issue #22 every check of every model passes.
EXPECTED_FAILURES: dict[str, dict[str, str]] = {}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (perturbed, eval mode) and its example input."""
    torch.manual_seed(0)
    if name in REDUCED:
        model = REDUCED[name]()
    elif name in VIT_IMAGE:
        model = tvm.get_model(name, weights=None, image_size=VIT_IMAGE[name])
    else:
        model = tvm.get_model(name, weights=None)
    side = VIT_IMAGE.get(name) or SIDES.get(name, SIDE)
    return bz.perturb(model), torch.rand(1, 3, side, side)


_LAST: dict[str, dict[str, Any]] = {}


def record(name: str) -> dict[str, Any]:
    """The measurement of one model, computed once for its five checks (they run one after the other)."""
    if name not in _LAST:
        _LAST.clear()
        model, x = build(name)
        _LAST[name] = bz.measure(name, model, x)
    return _LAST[name]


def _cases() -> list[Any]:
    out = []
    for name in MODELS:
        for check in CHECKS:
            reason = EXPECTED_FAILURES.get(name, {}).get(check)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(name, check, marks=marks, id=f"{name}-{check}"))
    return out


def _why(rec: dict[str, Any], *stages: str) -> str:
    errors = rec.get("errors") or {}
    found = [f"{s}: {errors[s]}" for s in stages if s in errors]
    return "; ".join(found) or "no error recorded"


@pytest.mark.parametrize(("name", "check"), _cases())
def test_torchvision_classifier(name: str, check: str) -> None:
    rec = record(name)
    if check == "prune":
        assert rec["ok"], f"{name}: {_why(rec, 'analyze', 'apply', 'forward')}"
    elif check == "equivalent":
        assert rec["ok"], f"{name}: not checked, pruning failed ({_why(rec, 'analyze', 'apply', 'forward')})"
        assert rec["equivalent"], (f"{name}: pruned != masked original ({rec['equivalence_scope']}), max relative "
                                   f"error {rec['max_rel_err']} ({_why(rec, 'equivalence')})")
    elif check == "macs_dense":
        assert rec["macs_dense"] is not None, f"{name}: {_why(rec, 'analyze')}"
        assert rec["macs_dense_counter"] is not None, f"{name}: {_why(rec, 'counter')}"
        assert rec["macs_dense"] == rec["macs_dense_counter"], (
            f"{name}: closed form {rec['macs_dense']:,} != counted {rec['macs_dense_counter']:,} MACs (dense)")
    elif check == "macs_pruned":
        assert rec["ok"], f"{name}: not checked, pruning failed ({_why(rec, 'analyze', 'apply', 'forward')})"
        assert rec["macs_pruned_counter"] is not None, f"{name}: {_why(rec, 'counter')}"
        assert rec["macs_pruned"] == rec["macs_pruned_counter"], (
            f"{name}: closed form {rec['macs_pruned']:,} != counted {rec['macs_pruned_counter']:,} MACs (pruned)")
    else:
        assert rec["unchanged"], f"{name}: {_why(rec, 'unchanged')}"


def test_the_zoo_is_all_there() -> None:
    """The parametrization covers torchvision's classifiers (a failed registry import would leave it empty)."""
    assert len(MODELS) >= 80, MODELS
    for name in ("resnet50", "mobilenet_v3_large", "shufflenet_v2_x1_0", "vit_b_16", "swin_t", "maxvit_t",
                 "efficientnet_v2_s", "convnext_tiny", "regnet_y_128gf", "inception_v3"):
        assert name in MODELS


def test_expected_failures_name_real_models_and_checks() -> None:
    """Every entry of EXPECTED_FAILURES names a model of the zoo, a known check and a reason."""
    for name, checks in EXPECTED_FAILURES.items():
        assert name in MODELS, name
        for check, reason in checks.items():
            assert check in CHECKS and reason, (name, check)


def test_reduced_configurations_keep_their_classes() -> None:
    """A reduced configuration is the same class as torchvision's builder gives (only sizes differ)."""
    expected = {"vit": torchvision.models.VisionTransformer, "maxvit": torchvision.models.MaxVit,
                "regnet": torchvision.models.RegNet, "convnext": torchvision.models.ConvNeXt}
    for name, factory in REDUCED.items():
        assert isinstance(factory(), expected[name.split("_")[0]]), name
