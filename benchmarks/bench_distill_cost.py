"""Benchmark: what knowledge distillation costs per fine-tune step on a CPU (issue #20).

The export fine-tune distils from the dense model by default (``export.distill: 0.9``): every SGD step also runs
the dense teacher forward on the batch, without gradients. This measures the product's
:class:`autoprune.evaluate.StepTrainer` with and without distillation on the same pruned network — the
``uniform`` candidate at 50 % of the dense MACs of CIFAR ResNet-20 and ResNet-56 — at batch 128 and one torch
thread, the two interleaved ``--reps`` times (median of the per-step times). The data are random tensors: the
cost of a step does not depend on the pixel values, and no dataset is needed.

Run: ``python -m benchmarks.bench_distill_cost [--quick] [--reps 5] [--steps 18] [--models resnet20,resnet56]``
Writes ``results/benchmarks/distill_cost.{md,json}`` (``distill_cost_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks._common import command_line, write_json, write_result

BATCH = 128
TARGET = 0.5  # of the dense MACs
WEIGHT, TEMPERATURE = 0.9, 4.0  # export.distill's defaults


def uniform_candidate(model_name: str) -> tuple[torch.nn.Module, Any, float]:
    """The dense model, the ``uniform`` candidate at :data:`TARGET` of its MACs, and that candidate's MACs ratio."""
    from autoprune import graph
    from autoprune.agents.base import BudgetGuard
    from autoprune.agents.baselines import highest_bits
    from autoprune.models import build_model
    from autoprune.objectives import Budget
    from autoprune.problem import Problem
    from autoprune.search_spaces import build_space

    dense = build_model(model_name).eval()
    example = torch.rand(1, 3, 32, 32)
    groups = graph.analyze(dense, example)

    class NoEvaluator:
        name = "none"

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("this benchmark does not evaluate")

    problem = Problem(dense, groups, build_space(groups, model_name=model_name, min_ratio=0.2), NoEvaluator(), example)
    guard = BudgetGuard(problem, Budget.from_config({"macs": TARGET}))
    cand, _ = guard.repair([1.0] * len(problem.space.groups), highest_bits(problem))
    return dense, problem.build(cand), problem.cost(cand).macs / problem.dense_cost.macs


def time_steps(dense: torch.nn.Module, pruned: torch.nn.Module, *, distill: bool, steps: int) -> tuple[float, float]:
    """Seconds per step of a fresh copy of ``pruned`` (after 2 warm-up steps), and the teacher's seconds per batch
    (0 without distillation)."""
    import copy

    from autoprune.distill import Distillation
    from autoprune.evaluate import SGDSettings, StepTrainer

    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(BATCH, 3, 32, 32, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(steps + 2)]
    student = copy.deepcopy(pruned).train()
    kw: dict[str, Any] = {"distill": Distillation(WEIGHT, TEMPERATURE), "teacher": dense} if distill else {}
    trainer = StepTrainer(student, data, SGDSettings(lr=0.01), total_steps=steps + 2, **kw)
    trainer.run(2)
    teacher_before = trainer.teacher.seconds if trainer.teacher is not None else 0.0
    start = time.perf_counter()
    trainer.run(steps)
    per_step = (time.perf_counter() - start) / steps
    teacher = (trainer.teacher.seconds - teacher_before) / steps if trainer.teacher is not None else 0.0
    return per_step, teacher


def measure(model_name: str, reps: int, steps: int) -> dict[str, Any]:
    dense, pruned, ratio = uniform_candidate(model_name)
    ce: list[float] = []
    kd: list[float] = []
    teacher: list[float] = []
    for _ in range(reps):  # interleaved, so that a change of load hits both
        ce.append(time_steps(dense, pruned, distill=False, steps=steps)[0])
        step, t = time_steps(dense, pruned, distill=True, steps=steps)
        kd.append(step)
        teacher.append(t)
    m_ce, m_kd, m_t = statistics.median(ce), statistics.median(kd), statistics.median(teacher)
    return {"model": model_name, "macs_ratio": round(ratio, 4), "ce_seconds_per_step": m_ce,
            "kd_seconds_per_step": m_kd, "teacher_seconds_per_batch": m_t, "kd_over_ce": m_kd / m_ce,
            "teacher_share_of_kd_step": m_t / m_kd, "ce_all": ce, "kd_all": kd}


def summarise(rows: Sequence[dict[str, Any]], reps: int, steps: int) -> str:
    lines = [
        f"The product's `StepTrainer`, SGD at batch {BATCH}, one torch thread; the `uniform` candidate at "
        f"{TARGET:.0%} of the dense MACs; distillation weight {WEIGHT}, temperature {TEMPERATURE:g} "
        f"(`export.distill`'s default); median of {reps} interleaved repetitions of {steps} steps each, after 2 "
        "warm-up steps. Random inputs (a step's cost does not depend on the pixels).", "",
        "| model | MACs ratio | CE s/step | KD s/step | KD / CE | teacher s/batch | teacher share of a KD step |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['macs_ratio']:.3f} | {r['ce_seconds_per_step']:.3f} | "
                     f"{r['kd_seconds_per_step']:.3f} | **{r['kd_over_ce']:.2f}×** | "
                     f"{r['teacher_seconds_per_batch']:.3f} | {r['teacher_share_of_kd_step']:.0%} |")
    extra = ", ".join(f"{r['model']} {r['kd_over_ce'] - 1:.0%}" for r in rows)
    lines += ["", "The teacher's forward pass is the dense model's inference on the batch: with the student at half "
              f"the MACs a distilled step costs this much more than a plain one: {extra}. Whether that pays is in "
              "`recovery.md`, section \"Distillation against plain cross-entropy\": the two fine-tune curves of "
              "each candidate at equal epochs and, with these ratios, at about equal compute."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark: the cost of distillation per fine-tune step (issue #20).")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, 2 repetitions of 3 steps")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repetition (default 18)")
    parser.add_argument("--models", default=None, help="comma-separated (default resnet20,resnet56)")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    steps = args.steps or (3 if args.quick else 18)
    models = [m.strip() for m in (args.models or ("resnet20" if args.quick else "resnet20,resnet56")).split(",")]
    if reps < 1 or steps < 1:
        parser.error("--reps and --steps must be at least 1")
    torch.set_num_threads(1)
    rows = []
    for m in models:
        print(f"{m}: timing {reps} × {steps} steps with and without distillation", flush=True)
        rows.append(measure(m, reps, steps))
    name = "distill_cost_quick" if args.quick else "distill_cost"
    write_json(name, {"command": command_line(), "rows": rows, "reps": reps, "steps": steps, "batch": BATCH})
    write_result(name, "Distillation cost per fine-tune step (CPU, 1 thread)", summarise(rows, reps, steps))
    print(summarise(rows, reps, steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
