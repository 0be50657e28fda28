"""Mixed-precision training on a CPU: float16 autocast with a live GradScaler, and bfloat16.

Both run here whatever the CPU: the capability checks are patched to "native", which only decides the default
(emulated half precision is slow, not wrong). The tiny quickstart model trains in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import clone_state, differing_keys, tiny_config

from dfine.engine import precision
from dfine.engine.setup import TrainingRun, build_training
from dfine.engine.trainer import Trainer

FP16 = ("use_amp=true", "amp_dtype=float16")
BF16 = ("use_amp=true", "amp_dtype=bfloat16")


@pytest.fixture
def native_half(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_cpu_has_fast_fp16", lambda: True)
    monkeypatch.setattr(precision, "_cpu_has_fast_bf16", lambda: True)


def _first_batch(run: TrainingRun) -> tuple[torch.Tensor, list[dict]]:
    images, targets = next(iter(run.train_loader))
    return images, targets


def test_fp16_on_a_cpu_runs_autocast_with_an_enabled_scaler(
    native_half: None, data_root: Path, tmp_path: Path
) -> None:
    run = build_training(tiny_config(tmp_path, data_root, *FP16, epochs=1))
    assert (run.step.use_amp, run.step.amp_dtype) == (True, torch.float16)
    assert run.step.scaler.is_enabled()
    seen = []
    handle = run.model.decoder.register_forward_hook(
        lambda module, args, output: seen.append(output["pred_logits"].dtype)
    )
    result = run.step(*_first_batch(run), 0)
    handle.remove()
    assert result is not None and result.optimizer_stepped
    assert seen == [torch.float16], "the forward pass must run under float16 autocast"


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(
    native_half: None, data_root: Path, tmp_path: Path
) -> None:
    # A loss scale of 2**60 overflows every float16 gradient: the scaler must skip the update and halve.
    run = build_training(
        tiny_config(tmp_path, data_root, *FP16, "scaler.init_scale=1.152921504606847e+18", epochs=1)
    )
    before = _parameters(run)
    result = run.step(*_first_batch(run), 0)
    assert result is not None and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert run.step.scaler.get_scale() == 2.0**60 * 0.5
    assert differing_keys(before, _parameters(run)) == [], "an overflowing step must not move a weight"
    # A fused AdamW allocates its state but leaves its step count at 0 when the scaler reports an overflow.
    steps = [float(state["step"]) for state in run.optimizer.state.values()]
    assert all(step == 0 for step in steps), "AdamW must not have taken the step"
    # The next step, at a scale float16 holds, trains.
    run.step.scaler.update(2.0**10)
    assert run.step(*_first_batch(run), 1) is not None
    assert differing_keys(before, _parameters(run)) != []


def _parameters(run: TrainingRun) -> dict[str, torch.Tensor]:
    # Parameters only: BatchNorm's running statistics move in every training forward, stepped or not.
    return {name: p.detach().clone() for name, p in run.model.named_parameters()}


def _reference_and_resumed(
    tmp_path: Path, data_root: Path, *precision_args: str
) -> tuple[Trainer, Trainer, float]:
    """3-epoch runs: one straight through, one resumed from its epoch-0 checkpoint; and the resumed scale."""
    args = (*precision_args, "checkpoint_freq=1")
    reference = Trainer(build_training(tiny_config(tmp_path / "full", data_root, *args, epochs=3)))
    reference.fit()
    checkpoint = tmp_path / "full" / "checkpoint0000.pth"
    resumed = Trainer(
        build_training(tiny_config(tmp_path / "resumed", data_root, *args, epochs=3), resume=str(checkpoint))
    )
    scale_at_start = resumed.run.step.scaler.get_scale()
    resumed.fit()
    return reference, resumed, scale_at_start


def test_fp16_resume_restores_the_scaler_and_reproduces_the_weights_bit_exactly(
    native_half: None, data_root: Path, tmp_path: Path
) -> None:
    # growth_interval=1: the scale doubles on every good step, so a resume that forgot it would end lower.
    reference, resumed, scale_at_start = _reference_and_resumed(
        tmp_path, data_root, *FP16, "scaler.init_scale=256.0", "scaler.growth_interval=1"
    )
    saved = torch.load(tmp_path / "full" / "checkpoint0000.pth", weights_only=True)["scaler"]
    assert saved["scale"] == 256.0 * 2**2, "2 good steps in epoch 0 must double the scale twice"
    assert scale_at_start == saved["scale"], "the resume must start from the saved scale, not 256"
    # Later steps may overflow at the doubled scales (how often depends on the CPU's kernels) and halve it;
    # the resumed run must take the same path.
    assert resumed.run.step.scaler.get_scale() == reference.run.step.scaler.get_scale() > saved["scale"] / 2
    assert differing_keys(clone_state(reference.run.model), clone_state(resumed.run.model)) == []
    assert differing_keys(clone_state(reference.run.ema.module), clone_state(resumed.run.ema.module)) == []


def test_bf16_trains_without_a_scaler_and_resumes_bit_exactly(
    native_half: None, data_root: Path, tmp_path: Path
) -> None:
    reference, resumed, _ = _reference_and_resumed(tmp_path, data_root, *BF16)
    assert (reference.run.step.use_amp, reference.run.step.amp_dtype) == (True, torch.bfloat16)
    assert not reference.run.step.scaler.is_enabled()
    assert differing_keys(clone_state(reference.run.model), clone_state(resumed.run.model)) == []
    assert differing_keys(clone_state(reference.run.ema.module), clone_state(resumed.run.ema.module)) == []
