"""Speed settings (dfine/engine/acceleration.py): the channels-last default per device, checkpoints in the
standard layout whatever the training layout, the same gradients in both layouts, and compile: true keeping
the state-dict keys and an eager EMA copy."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.testing import assert_close
from trainer_helpers import tiny_config

from dfine.engine.acceleration import choose_channels_last
from dfine.engine.setup import TrainingRun, build_training

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_channels_last_defaults_to_cpus_and_to_cuda_under_amp_and_an_explicit_value_wins() -> None:
    assert choose_channels_last({}, CPU) is True
    assert choose_channels_last({"use_amp": False}, CUDA) is False
    assert choose_channels_last({"use_amp": True}, CUDA) is True
    assert choose_channels_last({"channels_last": False}, CPU) is False
    assert choose_channels_last({"channels_last": True, "use_amp": False}, CUDA) is True


def _conv_weights(run: TrainingRun) -> list[torch.Tensor]:
    return [p for p in run.model.parameters() if p.dim() == 4]


def test_a_channels_last_run_trains_in_nhwc_and_saves_standard_layout_checkpoints(
    data_root: Path, tmp_path: Path
) -> None:
    run = build_training(tiny_config(tmp_path, data_root, epochs=1))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(run))
    assert not all(w.is_contiguous() for w in _conv_weights(run)), "the weights were not converted"
    run.checkpoints.save("last.pth")
    checkpoint = torch.load(tmp_path / "last.pth", weights_only=True)
    for part in (checkpoint["model"], checkpoint["ema"]["module"]):
        assert all(tensor.is_contiguous() for tensor in part.values()), "safetensors needs contiguous tensors"
    nchw = build_training(tiny_config(tmp_path / "nchw", data_root, "channels_last=false", epochs=1))
    assert all(w.is_contiguous() for w in _conv_weights(nchw))


def test_both_layouts_give_the_same_losses_and_gradients_up_to_summation_order(
    data_root: Path, tmp_path: Path
) -> None:
    runs = {
        layout: build_training(tiny_config(tmp_path / layout, data_root, f"channels_last={flag}", epochs=1))
        for layout, flag in (("nhwc", "true"), ("nchw", "false"))
    }
    images, targets = next(iter(runs["nchw"].train_loader))
    losses, grads = {}, {}
    for layout, run in runs.items():
        torch.manual_seed(0)  # the same denoising noise
        losses[layout] = run.step.backward(images, targets, index=0)
        grads[layout] = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    assert losses["nhwc"] is not None and losses["nchw"] is not None
    assert_close(losses["nhwc"], losses["nchw"], rtol=1e-4, atol=1e-5)
    assert grads["nhwc"].keys() == grads["nchw"].keys()
    largest = max(grad.norm() for grad in grads["nchw"].values())
    compared = [name for name, grad in grads["nchw"].items() if grad.norm() > 1e-3 * largest]
    # NHWC kernels sum in another order; through train-mode BatchNorm's cancelling sums that leaves ~0.5%
    # (median over tensors) between the layouts, the order of bf16 autocast. Measured: median 0.48%, worst
    # 8% on a learnable-affine scale. A wrong kernel (or a transposed layout) would be O(1) off.
    errors = sorted(
        float((grads["nhwc"][n] - grads["nchw"][n]).norm() / grads["nchw"][n].norm()) for n in compared
    )
    assert errors[len(errors) // 2] < 2e-2
    for name in compared:
        cosine = torch.nn.functional.cosine_similarity(
            grads["nhwc"][name].flatten(), grads["nchw"][name].flatten(), 0
        )
        assert cosine > 0.99, f"{name}: the layouts' gradients point apart (cosine {cosine:.4f})"


def test_compile_keeps_the_state_dict_keys_and_leaves_the_ema_copy_eager(
    data_root: Path, tmp_path: Path
) -> None:
    plain = build_training(tiny_config(tmp_path / "plain", data_root, epochs=1))
    compiled = build_training(tiny_config(tmp_path / "compiled", data_root, "compile=true", epochs=1))
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())
    assert compiled.model.backbone._compiled_call_impl is not None
    assert compiled.model.encoder._compiled_call_impl is not None
    assert compiled.model.decoder._compiled_call_impl is None
    # A deep copy of a compiled module would run the original's compiled code with the original's weights.
    assert compiled.ema is not None and compiled.ema.module.backbone._compiled_call_impl is None
