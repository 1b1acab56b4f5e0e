"""Slow end-to-end tests of the compression environment on real models, data and evaluators.

* Three full AMC-style episodes on the pretrained ResNet-20 (akamaster weights, real CIFAR-10 from ../shared),
  scored by the adaptive-BN evaluator on a validation subset; the wall time is printed (run with ``-s``).
* Two ``SubprocVecEnv`` workers, each building its own problem on a tiny zoo model, evaluating real pruned
  candidates in parallel.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune import graph
from autoprune._imports import is_available
from autoprune.data import load_dataset, make_loader
from autoprune.envs import LayerwiseCompressionEnv, make_env
from autoprune.evaluate import AdaptiveBNEvaluator, PlainEvaluator
from autoprune.models import build_model
from autoprune.models.checkpoint import load_checkpoint
from autoprune.problem import Problem
from autoprune.search_spaces import build_space
from autoprune.types import Candidate

pytestmark = pytest.mark.slow


def resnet20_problem(cifar10_dir: Path, weights_dir: Path, *, quantize: bool = False) -> Problem:
    splits = load_dataset("cifar10", cifar10_dir, val_size=5000, seed=0)
    info = splits.info
    model = build_model("resnet20", num_classes=info.num_classes, mean=info.mean, std=info.std)
    load_checkpoint(model, weights_dir / "resnet20-12fca82f.th")
    model.eval()
    x = torch.rand(1, *info.input_shape)
    gs = graph.analyze(model, x)
    space = build_space(gs, model_name="resnet20", quantize=quantize)
    calib = make_loader(splits.train, 64, shuffle=True, seed=0)
    val = make_loader(splits.val, 250, limit=4)  # 1 000 validation images
    evaluator = AdaptiveBNEvaluator(calib, val, batches=10, device="cpu")  # 640 calibration images
    return Problem(model=model, groups=gs, space=space, evaluator=evaluator, example_input=x)


def test_three_episodes_on_pretrained_resnet20(cifar10_dir: Path, weights_dir: Path) -> None:
    torch.set_num_threads(1)  # on the shared 2-core machine one thread is ~5x faster than two (ENGINE.md §7.4)
    start = time.perf_counter()
    problem = resnet20_problem(cifar10_dir, weights_dir)
    setup_s = time.perf_counter() - start

    dense_result, _ = problem.evaluate(problem.space.full())
    assert dense_result.accuracy > 0.85  # the pretrained network scores ~91-92 % on CIFAR-10

    env = LayerwiseCompressionEnv(problem, mode="prune", reward="r_err", budget={"macs": 0.5})
    env.action_space.seed(0)
    limit = 0.5 * problem.dense_cost.macs
    episodes = []
    start = time.perf_counter()
    for episode in range(3):
        env.reset(seed=episode)
        info: dict = {}
        reward = 0.0
        for _ in range(env.episode_length):
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert terminated and not truncated
        assert info["feasible"] and info["cost"]["macs"] <= limit
        assert info["cost"]["macs"] >= 0.4 * problem.dense_cost.macs  # the lower bound keeps it near the budget
        acc = info["eval"]["accuracy"]
        assert 0.1 < acc <= dense_result.accuracy + 0.02  # better than chance, not better than dense
        assert reward == pytest.approx(-(1.0 - acc))
        problem.space.validate(Candidate.from_dict(info["candidate"]))
        episodes.append(info)
    episodes_s = time.perf_counter() - start

    env_s = sum(i["timing"]["env_seconds"] for i in episodes)
    eval_s = sum(i["timing"]["eval_seconds"] for i in episodes)
    accs = ", ".join(f"{i['eval']['accuracy']:.3f}" for i in episodes)
    print(f"\n[env integration] setup {setup_s:.1f}s; 3 episodes {episodes_s:.1f}s "
          f"(env logic {env_s:.3f}s, build+evaluate {eval_s:.1f}s); dense acc {dense_result.accuracy:.3f}; "
          f"episode accs {accs}; torch threads {torch.get_num_threads()}")
    assert env_s < 0.25 * eval_s


@pytest.mark.skipif(not is_available("autoprune.quantization"), reason="autoprune.quantization not available yet")
def test_joint_episode_on_pretrained_resnet20(cifar10_dir: Path, weights_dir: Path) -> None:
    torch.set_num_threads(1)
    problem = resnet20_problem(cifar10_dir, weights_dir, quantize=True)
    env = LayerwiseCompressionEnv(problem, mode="joint", reward="r_err", budget={"macs": 0.6, "size_bytes": 0.2})
    env.reset(seed=0)
    info: dict = {}
    for _ in range(env.episode_length):
        *_, info = env.step(np.array([0.5, 0.5], np.float32))
    assert info["feasible"] and info["cost"]["bytes"] <= info["limits"]["size_bytes"]
    assert 0.1 < info["eval"]["accuracy"] <= 1.0


def tiny_problem() -> Problem:
    """Built inside each worker process: a small zoo CNN on synthetic 16×16 images, plain evaluation."""
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    x = torch.rand(1, 3, 16, 16)
    gs = graph.analyze(model, x)
    space = build_space(gs, model_name="small_cnn", round_to=4)
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    return Problem(model=model, groups=gs, space=space, evaluator=PlainEvaluator(None, data, device="cpu"),
                   example_input=x)


def test_subproc_vec_env_builds_and_evaluates_real_candidates_in_workers() -> None:
    from stable_baselines3.common.vec_env import SubprocVecEnv

    factory = make_env(tiny_problem, mode="prune", budget={"macs": 0.5}, threads=1)
    venv = SubprocVecEnv([factory, factory])
    try:
        venv.reset()
        steps = venv.get_attr("episode_length")[0]
        infos: list = []
        for _ in range(steps):
            _, rewards, dones, infos = venv.step(np.array([[-1.0], [1.0]], np.float32))
        assert dones.all()
        for info in infos:
            assert info["feasible"] and info["timing"]["build_seconds"] > 0  # a real pruned network was built
            assert info["eval"]["evaluator"] == "plain"
        assert infos[0]["candidate"] != infos[1]["candidate"]
        assert rewards.shape == (2,)
    finally:
        venv.close()
