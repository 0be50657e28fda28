"""The D-FINE meta-architecture: backbone -> hybrid encoder -> FDR decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfine.config.registry import MODELS

__all__ = ["DFINE"]


@MODELS.register()
class DFINE(nn.Module):
    """Backbone, encoder and decoder in sequence; attribute names match the original checkpoints' keys.

    Args:
        backbone: returns a list of feature maps (e.g. :class:`HGNetv2`).
        encoder: fuses them (:class:`HybridEncoder`).
        decoder: predicts boxes and classes (:class:`DFINETransformer`).
    """

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        # Assignment order fixes the state-dict order: the original checkpoints list decoder before encoder.
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.channels_last = False  # see use_channels_last()

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
        """Detect objects.

        Args:
            images: [B, 3, H, W] float in 0..1 (H, W multiples of 32).
            targets: training targets (denoising queries are built from them); ignored in eval.

        Returns:
            Eval: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] cxcywh in 0..1. Training adds what the
            criterion needs (auxiliary, pre-decoder, encoder and denoising outputs, corners and references).
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self) -> DFINE:
        """Switch to the inference form: eval mode, BatchNorm folded, re-parameterised blocks, cached tables.

        Irreversible for this instance (training needs the unfused modules); used by export and benchmarks.
        """
        self.eval()
        for module in list(self.modules()):  # a list: conversions replace submodules
            if module is not self and hasattr(module, "convert_to_deploy"):
                module.convert_to_deploy()
        return self.use_channels_last()

    def use_channels_last(self, enabled: bool = True) -> DFINE:
        """Keep the 4-D weights in channels-last (NHWC) memory and convert each input batch to it on entry.

        oneDNN's convolutions (CPU) and cuDNN's tensor-core kernels (CUDA, fp16/bf16) run fastest in NHWC;
        callers keep passing ordinary NCHW tensors. State-dict keys and values do not change.
        """
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = enabled
        return self
