"""The training step: gradient accumulation and DDP no_sync on a toy model; non-finite losses and gradient
clipping on the tiny quickstart config (CPU)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from trainer_helpers import clone_state, differing_keys, tiny_config

from dfine.checkpoint import load_checkpoint
from dfine.engine import step as step_module
from dfine.engine.run_state import RunState
from dfine.engine.schedules import LRSchedule
from dfine.engine.setup import build_training
from dfine.engine.step import NonFiniteLossError, TrainStep
from dfine.engine.trainer import Trainer


class _RecordingWrapper(nn.Module):
    """Stands in for DDP: runs the model and records whether each forward ran inside ``no_sync``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model
        self.in_no_sync = False
        self.synced: list[bool] = []

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def forward(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        self.synced.append(not self.in_no_sync)
        return self.module(images)


def _squared_output(outputs: torch.Tensor, targets: Any, **meta: Any) -> dict[str, torch.Tensor]:
    return {"loss_a": outputs.pow(2).mean(), "loss_b": outputs.mean().abs()}


def test_accumulated_micro_batches_make_one_optimizer_step_outside_no_sync_only_on_the_last() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    wrapper = _RecordingWrapper(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = RunState(seed=0)
    step = TrainStep(
        model,
        _squared_output,  # type: ignore[arg-type]
        optimizer,
        LRSchedule(optimizer, steps_per_epoch=1, epochs=1),
        None,
        state,
        torch.device("cpu"),
        train_model=wrapper,
        grad_accum_steps=2,
    )
    batches = [torch.randn(4, 3) for _ in range(2)]
    expected = []
    for batch in batches:  # the total loss of each micro-batch, before any update
        with torch.no_grad():
            expected.append(sum(v.item() for v in _squared_output(model(batch), None).values()))
    before = clone_state(model)
    first = step(batches[0], [], 0)
    assert first is not None and not first.optimizer_stepped
    assert differing_keys(before, clone_state(model)) == [] and state.global_step == 0
    second = step(batches[1], [], 1)
    assert second is not None and second.optimizer_stepped
    assert state.global_step == 1 and set(differing_keys(before, clone_state(model))) == {"weight", "bias"}
    assert wrapper.synced == [False, True], "all but the last micro-batch run inside no_sync"
    assert state.step_losses == pytest.approx([sum(expected) / 2])
    assert step.lr_schedule.global_step == 1


def _nan_once(criterion: nn.Module, term: str, times: int) -> list[int]:
    """Make the criterion return NaN for ``term`` on its next ``times`` calls; returns a call counter."""
    forward = criterion.forward
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        losses = forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] <= times:
            losses[term] = losses[term] * float("nan")
        return losses

    criterion.forward = patched
    return calls


def test_a_non_finite_loss_skips_the_step_with_a_warning_naming_the_term(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = Trainer(build_training(tiny_config(tmp_path, data_root, epochs=1)))
    before = clone_state(trainer.run.model)
    _nan_once(trainer.run.criterion, "loss_giou", times=1)
    with caplog.at_level(logging.WARNING, logger="dfine.engine.step"):
        stats = trainer.train_one_epoch(0)
    assert trainer.state.global_step == 1, "the NaN step must be skipped, the other one taken"
    assert any("loss_giou" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert np.isfinite(stats["loss"])
    after = clone_state(trainer.run.model)
    assert all(torch.isfinite(value).all() for value in after.values() if value.is_floating_point())
    assert differing_keys(before, after), "the finite step must still update the model"


def test_repeated_non_finite_losses_stop_the_run_and_keep_last_pth_loadable(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_module, "MAX_NON_FINITE_STEPS", 2)
    trainer = Trainer(build_training(tiny_config(tmp_path, data_root, epochs=2)))
    trainer.run.epochs = 1
    trainer.fit()
    good = clone_state(trainer.run.model)
    trainer.run.epochs = 2
    _nan_once(trainer.run.criterion, "loss_bbox", times=10**6)
    with pytest.raises(NonFiniteLossError, match=r"loss_bbox.*last\.pth"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "last.pth")
    assert checkpoint["epoch"] == 1
    assert differing_keys(good, checkpoint["model"]) == []


def test_gradient_clipping_bounds_the_total_gradient_norm(data_root: Path, tmp_path: Path) -> None:
    max_norm = 1e-3
    norms = {}
    for clip in (0.0, max_norm):
        run = build_training(tiny_config(tmp_path / str(clip), data_root, f"clip_max_norm={clip}"))
        step = run.step
        optimizer_step = step.optimizer.step

        def record(
            *args: Any,
            _model: nn.Module = run.model,
            _step: Any = optimizer_step,
            _clip: float = clip,
            **kwargs: Any,
        ) -> Any:
            grads = [p.grad for p in _model.parameters() if p.grad is not None]
            norms[_clip] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            return _step(*args, **kwargs)

        step.optimizer.step = record
        run.train_loader.set_epoch(0)
        images, targets = next(iter(run.train_loader))
        assert step.backward(images, targets, 0) is not None
        step.optimizer_step()
    assert norms[0.0] > 10 * max_norm, "the test needs a gradient larger than the clip"
    assert norms[max_norm] <= max_norm * (1 + 1e-4)
