"""Speed settings of a training run: memory layout, cuDNN autotuning and the opt-in ``torch.compile``.

None of them changes the model or its checkpoints. They change the order in which kernels sum: with
channels-last, training outputs and losses agree with NCHW to ~1e-6, gradients to ~0.5% (median per tensor,
measured on the quickstart model; train-mode BatchNorm's cancelling sums amplify the reordering), which is the
order of what bf16 autocast does and far below the noise of sampling a batch. Against a float64 reference,
NCHW's fp32 gradients are within ~1e-5 and NHWC's within ~0.6%: NHWC is the less exact layout, which is why
``channels_last: false`` exists.

Config keys (top level):

- ``channels_last`` (bool, default: on for CPUs, and on CUDA when ``use_amp``): weights and input batches in
  NHWC memory, the layout oneDNN's CPU convolutions and cuDNN's tensor-core kernels run fastest in.
- ``cudnn_benchmark`` (bool, default true): let cuDNN time its convolution algorithms once per input shape
  (multi-scale training has about a dozen shapes). CUDA only.
- ``compile`` (bool, default false): ``torch.compile`` the backbone and encoder, where most of the step's
  time goes, with dynamic shapes so multi-scale sizes do not recompile each. The decoder stays eager: its
  query count follows the number of boxes in the batch (denoising), which would recompile it on most batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["apply_speed_settings", "choose_channels_last", "compile_hot_modules"]

# Submodules of DFINE that compile cleanly under dynamic shapes (no data-dependent sizes inside).
COMPILED_PARTS = ("backbone", "encoder")


def choose_channels_last(cfg: Mapping[str, Any], device: torch.device) -> bool:
    """``channels_last`` from the config, or the measured default for ``device`` when it is unset.

    On a 2-core CPU NHWC made the D-FINE-N training step faster (``tools/benchmark_train.py --nchw``
    times both); on CUDA the gain needs tensor cores, hence only with ``use_amp`` unless asked for.
    """
    value = cfg.get("channels_last")
    if value is not None:
        return bool(value)
    return device.type == "cpu" or (device.type == "cuda" and bool(cfg.get("use_amp")))


def compile_hot_modules(model: nn.Module) -> None:
    """Compile ``model.backbone`` and ``model.encoder`` in place with ``torch.compile`` (dynamic shapes).

    The modules are compiled in place, so the state dict, the optimizer and the EMA see the same tensors and
    keys. Call it after the EMA copy is made: a deep copy of a compiled module would still run the
    original's compiled code. Compilation itself happens at the first batches (one graph for all sizes, plus
    the eval-mode graph at the first evaluation), so the first step is slow.

    Raises:
        TypeError: ``model`` has neither a ``backbone`` nor an ``encoder`` to compile.
    """
    parts = [name for name in COMPILED_PARTS if isinstance(getattr(model, name, None), nn.Module)]
    if not parts:
        raise TypeError(
            f"compile: true needs a model with {' or '.join(COMPILED_PARTS)} submodules; "
            f"{type(model).__name__} has neither. Set compile: false."
        )
    for name in parts:
        # In place (nn.Module.compile), not torch.compile(module): a wrapper module would prefix every
        # state-dict key with "_orig_mod.".
        getattr(model, name).compile(dynamic=True)


def apply_speed_settings(model: nn.Module, cfg: Mapping[str, Any], device: torch.device) -> list[str]:
    """Apply ``channels_last`` and ``cudnn_benchmark``; call before DDP wraps ``model`` (its gradient buckets
    take the parameters' layout). ``compile`` is separate: :func:`compile_hot_modules`.

    Returns:
        Short descriptions of what is on, for the start-up log line.
    """
    settings = []
    if choose_channels_last(cfg, device):
        use_channels_last = getattr(model, "use_channels_last", None)
        if use_channels_last is None:
            model.to(memory_format=torch.channels_last)  # weights only; inputs stay as the caller gives them
        else:
            use_channels_last(True)
        settings.append("channels-last")
    if device.type == "cuda" and cfg.get("cudnn_benchmark", True):
        torch.backends.cudnn.benchmark = True  # process-wide by nature; this process only trains
        settings.append("cudnn.benchmark")
    return settings
