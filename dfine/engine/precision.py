"""Mixed precision for training: which autocast dtype a device runs well, and the ``scaler`` block.

``use_amp`` / ``amp_dtype`` ask for autocast; :func:`choose_precision` adapts the request to the device
(emulated half precision on a CPU is several times slower than fp32, so a CPU without native float16 /
bfloat16 kernels falls back). The ``scaler`` block (``{type: GradScaler, enabled, init_scale, growth_factor,
backoff_factor, growth_interval}``, the arguments of ``torch.amp.GradScaler``) is built by
:func:`build_grad_scaler`, which hands over the device; it scales float16 losses on CUDA and on CPUs alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from dfine.config import Config
from dfine.config.build import build_block
from dfine.config.registry import SCALERS, ConfigError

__all__ = ["build_grad_scaler", "choose_precision"]

logger = logging.getLogger(__name__)

SCALERS.register("GradScaler")(torch.amp.GradScaler)


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_has_fast_fp16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(cfg: Config, device: torch.device) -> tuple[bool, torch.dtype]:
    """``(use_amp, amp_dtype)`` from ``use_amp`` / ``amp_dtype``, adjusted to what ``device`` does well.

    On a CPU, float16 autocast runs where the CPU has native float16 kernels (AVX512-FP16 / AMX), else
    becomes bfloat16 where that is native; AMP is switched off (fp32) when the requested type has neither.

    Raises:
        ConfigError: ``amp_dtype`` is neither float16 nor bfloat16.
    """
    use_amp = bool(cfg.get("use_amp"))
    name = str(cfg.get("amp_dtype") or "float16")
    if name not in ("float16", "bfloat16"):
        raise ConfigError(f"{cfg.where('amp_dtype')} must be float16 or bfloat16, got '{name}'")
    amp_dtype = getattr(torch, name)
    if not use_amp or device.type != "cpu":
        return use_amp, amp_dtype
    if amp_dtype == torch.float16 and not _cpu_has_fast_fp16():
        logger.info("use_amp: this CPU has no native float16; trying bfloat16 autocast")
        amp_dtype = torch.bfloat16
    if amp_dtype == torch.bfloat16 and not _cpu_has_fast_bf16():
        # Measured: bf16 autocast made a D-FINE-N step ~8x slower on a CPU without native bf16.
        logger.warning(
            "use_amp: this CPU has no native bfloat16, where autocast is far slower; training fp32"
        )
        use_amp = False
    return use_amp, amp_dtype


def build_grad_scaler(
    block: Mapping[str, Any] | None,
    device: torch.device,
    use_amp: bool,
    amp_dtype: torch.dtype,
    where: str = "scaler",
) -> torch.amp.GradScaler:
    """Build the ``scaler`` block for ``device``; ``None`` gives ``{type: GradScaler}``.

    A loss scale only helps float16 gradients, so the scaler runs only under float16 autocast (CUDA or CPU,
    and only when the block does not say ``enabled: false``); otherwise it is built disabled and passes
    everything through, and its state is still checkpointed.

    Raises:
        ConfigError: an unknown type or argument in the block.
    """
    block = dict(block or {"type": "GradScaler"})
    needed = use_amp and amp_dtype == torch.float16 and device.type in ("cuda", "cpu")
    block["enabled"] = bool(block.get("enabled", True)) and needed
    return build_block("scaler", block, where, device=device.type)
