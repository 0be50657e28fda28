"""Precision settings and the ``scaler`` block (dfine/engine/precision.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_config

from dfine.config.registry import ConfigError
from dfine.engine import precision
from dfine.engine import setup as engine_setup
from dfine.engine.precision import build_grad_scaler
from dfine.engine.setup import build_training

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FP16 = ("use_amp=true", "amp_dtype=float16")


def test_amp_on_a_cpu_without_native_half_precision_falls_back_to_fp32_with_a_warning(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision, "_cpu_has_fast_fp16", lambda: False)
    monkeypatch.setattr(precision, "_cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dfine.engine.precision"):
        run = build_training(tiny_config(tmp_path, data_root, *FP16, epochs=1))
    assert run.step.use_amp is False
    assert any("no native bfloat16" in record.getMessage() for record in caplog.records)
    monkeypatch.setattr(precision, "_cpu_has_fast_bf16", lambda: True)
    bf16 = build_training(tiny_config(tmp_path / "bf16", data_root, *FP16, epochs=1))
    assert (bf16.step.use_amp, bf16.step.amp_dtype) == (True, torch.bfloat16), "fp16 falls back to bf16"
    assert not bf16.step.scaler.is_enabled()
    monkeypatch.setattr(precision, "_cpu_has_fast_fp16", lambda: True)
    fp16 = build_training(tiny_config(tmp_path / "fp16", data_root, *FP16, epochs=1))
    assert (fp16.step.use_amp, fp16.step.amp_dtype) == (True, torch.float16)
    assert fp16.step.scaler.is_enabled()


def test_the_scaler_block_is_built_with_its_arguments_and_runs_only_for_float16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GradScaler switches itself off where CUDA is missing; building it (no tensors yet) needs no GPU.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    block = {"type": "GradScaler", "init_scale": 1024.0, "growth_interval": 10}
    scaler = build_grad_scaler(block, CUDA, use_amp=True, amp_dtype=torch.float16)
    assert scaler.is_enabled()
    assert (scaler._init_scale, scaler._growth_interval) == (1024.0, 10)
    assert build_grad_scaler(block, CPU, use_amp=True, amp_dtype=torch.float16).is_enabled()
    not_needed = [(CPU, True, torch.bfloat16), (CUDA, True, torch.bfloat16), (CUDA, False, torch.float16)]
    for device, use_amp, dtype in not_needed:
        assert not build_grad_scaler(block, device, use_amp, dtype).is_enabled()
    off = build_grad_scaler({"type": "GradScaler", "enabled": False}, CUDA, True, torch.float16)
    assert not off.is_enabled(), "enabled: false in the block must win"


def test_a_misspelt_scaler_argument_fails_when_the_config_is_loaded(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scaler\.init_scal is not an argument of GradScaler.*init_scale"):
        tiny_config(tmp_path, data_root, "scaler.init_scal=1024")
    with pytest.raises(ConfigError, match=r"scaler\.device.*passed to GradScaler by the builder"):
        tiny_config(tmp_path, data_root, "scaler.device=cuda")


def test_the_run_uses_the_scaler_built_from_the_block(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []

    def recording_build(block, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append((dict(block), build_grad_scaler(block, *args, **kwargs)))
        return built[-1][1]

    monkeypatch.setattr(engine_setup, "build_grad_scaler", recording_build)
    run = build_training(tiny_config(tmp_path, data_root, "scaler.init_scale=512.0", epochs=1))
    assert [block for block, _ in built] == [{"type": "GradScaler", "enabled": True, "init_scale": 512.0}]
    assert run.step.scaler is built[0][1]
    assert not run.step.scaler.is_enabled()  # fp32 on a CPU
