"""Training loop, schedules, resumption, callbacks, train_steps and evaluate on synthetic tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.models import build_model
from autoprune.models.checkpoint import load_checkpoint, read_checkpoint
from autoprune.train import (
    EarlyStopping,
    Metrics,
    evaluate,
    lr_at,
    make_optimizer,
    train,
    train_steps,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny batches: one thread avoids spin contention on busy machines


def _batches(n: int = 4, batch: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable task: the label is 1 when the image is bright, else 0 (plus 8 unused classes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 2, (batch,), generator=g)
        x = 0.25 * torch.rand(batch, 1, 8, 8, generator=g) + 0.5 * y.view(-1, 1, 1, 1)
        out.append((x, y))
    return out


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", in_channels=1, width=4)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Interrupt(Exception):
    pass


class _CrashAfter:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        if epoch == self.epoch:
            raise _Interrupt
        return False


class _Recorder:
    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[tuple[int, dict[str, float]]] = []
        self.stop_at = stop_at

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        self.seen.append((epoch, dict(metrics)))
        return epoch == self.stop_at


class _EpochLoader:
    """A deterministic loader whose batches depend on the epoch set through ``set_epoch``."""

    def __init__(self) -> None:
        self.epochs_set: list[int] = []
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epochs_set.append(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return 3

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(_batches(3, 8, seed=100 + self.epoch))


def test_lr_schedules() -> None:
    assert lr_at(0.1, 0.0, "cosine") == pytest.approx(0.1)
    assert lr_at(0.1, 0.5, "cosine") == pytest.approx(0.05)
    assert lr_at(0.1, 1.0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert [lr_at(1.0, f, "step") for f in (0.0, 0.49, 0.5, 0.74, 0.75, 0.99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert lr_at(0.3, 0.9, "constant") == 0.3
    assert lr_at(0.1, 0.05, "cosine", warmup=0.1) == pytest.approx(0.05)
    assert lr_at(0.1, 0.1, "cosine", warmup=0.1) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="schedule"):
        lr_at(0.1, 0.5, "linear")  # type: ignore[arg-type]


def test_optimizer_skips_weight_decay_on_bn_and_bias() -> None:
    model = _model()
    opt = make_optimizer(model, lr=0.1, weight_decay=1e-3)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 1e-3 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    all_decay = make_optimizer(model, lr=0.1, weight_decay=1e-3, decay_norm_and_bias=True)
    assert len(all_decay.param_groups) == 1
    with pytest.raises(ConfigError):
        make_optimizer(model, lr=-1.0)
    with pytest.raises(ConfigError, match="Nesterov"):
        make_optimizer(model, lr=0.1, momentum=0.0, nesterov=True)


def test_train_learns_and_records_history() -> None:
    data = _batches(6)
    model = _model()
    before = evaluate(model, data)
    history = train(model, data, epochs=4, lr=0.05, val_loader=data[:2], device="cpu")
    after = evaluate(model, data)
    assert len(history.epochs) == 4 and not history.stopped_early
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4]
    assert after.top1 >= 0.95
    assert after.loss < before.loss
    assert history.epochs[-1].lr < history.epochs[0].lr  # cosine decays
    assert history.last is not None and history.last.val is not None
    assert history.best_val is not None and history.best_val.top1 >= history.epochs[0].val.top1  # type: ignore[union-attr]
    assert model.training


def _dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))


@pytest.mark.parametrize("make", [_model, _dropout_mlp], ids=["small_cnn", "dropout_mlp"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path: Path, make: Callable[..., nn.Module]) -> None:
    data = _EpochLoader()
    straight = make()
    h_straight = train(straight, data, epochs=3, lr=0.05, device="cpu", checkpoint_path=tmp_path / "a.pt")

    interrupted = make()
    with pytest.raises(_Interrupt):
        train(
            interrupted,
            _EpochLoader(),
            epochs=3,
            lr=0.05,
            device="cpu",
            checkpoint_path=tmp_path / "b.pt",
            callbacks=[_CrashAfter(1)],
        )
    assert read_checkpoint(tmp_path / "b.pt")["epoch"] == 1
    resumed_model = make(seed=123)  # different init: everything must come from the checkpoint
    loader = _EpochLoader()
    h_resumed = train(
        resumed_model, loader, epochs=3, lr=0.05, device="cpu", checkpoint_path=tmp_path / "b.pt", resume=True
    )
    assert loader.epochs_set == [1, 2]
    assert h_resumed.resumed_from == 1
    a, b = straight.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert [e.train_loss for e in h_resumed.epochs] == [e.train_loss for e in h_straight.epochs]


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    data = _batches(2)
    a, b = _model(), _model()
    train(a, data, epochs=1, lr=0.05, device="cpu")
    h = train(b, data, epochs=1, lr=0.05, device="cpu", checkpoint_path=tmp_path / "new.pt", resume=True)
    assert h.resumed_from is None
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkpoint_every_epoch_is_loadable_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "run" / "checkpoint.pt"
    seen_epochs = []

    class _Peek:
        def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
            seen_epochs.append(read_checkpoint(path)["epoch"])
            return False

    model = _model()
    train(
        model,
        _batches(2),
        epochs=2,
        lr=0.05,
        device="cpu",
        checkpoint_path=path,
        checkpoint_meta={"model_name": "small_cnn", "model_kwargs": {"in_channels": 1, "width": 4}},
        callbacks=[_Peek()],
    )
    assert seen_epochs == [1, 2]
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
    rebuilt = build_model("small_cnn", in_channels=1, width=4)
    meta = load_checkpoint(rebuilt, path)
    assert meta["model_name"] == "small_cnn" and meta["optimizer"] is not None
    assert len(meta["extra"]["train_state"]["history"]) == 2
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_resume_from_a_non_training_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save(_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="not a resumable"):
        train(_model(), _batches(1), epochs=1, device="cpu", checkpoint_path=tmp_path / "plain.pt", resume=True)


def test_callbacks_receive_metrics_and_can_stop() -> None:
    rec = _Recorder(stop_at=2)
    history = train(_model(), _batches(2), epochs=5, lr=0.05, val_loader=_batches(1), device="cpu", callbacks=[rec])
    assert history.stopped_early and len(history.epochs) == 2
    assert [e for e, _ in rec.seen] == [1, 2]
    assert {"train_loss", "train_top1", "lr", "val_top1", "val_loss"} <= rec.seen[0][1].keys()


def test_early_stopping() -> None:
    stop = EarlyStopping("val_top1", patience=2)
    assert [stop.on_epoch_end(i, {"val_top1": v}) for i, v in enumerate([0.5, 0.6, 0.6, 0.55], 1)] == [
        False,
        False,
        False,
        True,
    ]
    low = EarlyStopping("train_loss", patience=1, mode="min")
    assert low.on_epoch_end(1, {"train_loss": 1.0}) is False
    assert low.on_epoch_end(2, {"train_loss": 0.5}) is False
    assert low.on_epoch_end(3, {"train_loss": 0.7}) is True
    with pytest.raises(ConfigError, match="val_top1"):
        EarlyStopping().on_epoch_end(1, {"train_loss": 1.0})


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no batches"):
        train(_model(), [], epochs=1, device="cpu")
    with pytest.raises(ConfigError, match="schedule"):
        train(_model(), _batches(1), epochs=1, schedule="poly", device="cpu")  # type: ignore[arg-type]
    nan_batch = [(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ConfigError, match="diverged"):
        train(_model(), nan_batch, epochs=1, device="cpu")


def test_train_steps_takes_exactly_n_steps_cycling_the_loader() -> None:
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    stats = train_steps(model, _batches(3, batch=5), 7, lr=0.01, device="cpu")
    assert stats.steps == 7 and len(calls) == 7 and stats.samples == 35
    assert math.isfinite(stats.loss) and 0.0 <= stats.top1 <= 1.0
    before = _weights(model)
    assert train_steps(model, _batches(1), 0).steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    opt = torch.optim.SGD(model.parameters(), lr=0.003)
    train_steps(model, _batches(1), 2, optimizer=opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.003)  # the optimizer's own LR by default
    train_steps(model, _batches(1), 2, optimizer=opt, lr=0.02, schedule="cosine")
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(0.02, 0.5, "cosine"))  # LR of the last step
    with pytest.raises(ConfigError, match="no batches"):
        train_steps(model, [], 1)


class _FixedLogits(nn.Module):
    """Returns the logits stored for each input id (x[:, 0] holds the id)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def test_evaluate_metrics_are_exact() -> None:
    logits = torch.tensor(
        [
            [5.0, 1, 0, 0, 0, 0],  # label 0: top-1 right
            [5.0, 4, 0, 0, 0, 0],  # label 1: top-5 only
            [0.0, 0, 1, 0, 0, 9],  # label 2: second highest → top-5 only
            [9.0, 8, 7, 6, 5, 0],  # label 5: wrong in top-5
        ]
    )
    labels = torch.tensor([0, 1, 2, 5])
    model = _FixedLogits(logits).train()
    loader = [(torch.arange(2).view(2, 1).float(), labels[:2]), (torch.arange(2, 4).view(2, 1).float(), labels[2:])]
    m = evaluate(model, loader, num_classes=6)
    assert isinstance(m, Metrics) and m.samples == 4
    assert m.top1 == 0.25 and m.top5 == 0.75
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert m.loss == pytest.approx(expected_loss, rel=1e-6)
    assert m.per_class[:3] == (1.0, 0.0, 0.0) and m.per_class[5] == 0.0
    assert math.isnan(m.per_class[3]) and math.isnan(m.per_class[4])
    assert model.training, "evaluate must restore train mode"
    assert Metrics.from_dict(m.to_dict()).top5 == m.top5
    with pytest.raises(ConfigError, match="no samples"):
        evaluate(model, [])


def test_evaluate_runs_in_eval_mode_without_grad() -> None:
    model = _model().eval()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_inference_mode_enabled())))
    evaluate(model, _batches(1))
    assert seen == [(False, True)] and not model.training
