"""Inference-only forms of HGNetv2 layers that ``deploy()`` swaps in: equal outputs, fewer passes over memory.

Measured on D-FINE-N at 640x640, batch 1, 2 CPU threads, where the backbone's large early maps make every
elementwise pass and every fresh tensor count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfine.models.common import conv_with_bias_like

if TYPE_CHECKING:
    from dfine.models.hgnetv2 import ConvBNAct

__all__ = ["ClampAt", "ConcatConv", "MaxOf2x2"]


class ClampAt(nn.Module):
    """``max(x, bound)`` (or ``min`` when ``upper``) in place: the deployed form of ReLU then scale and bias.

    With ``s * relu(y) + b`` and ``s >= 0`` that is ``max(s * y + b, b)``; with ``s < 0`` it is
    ``min(s * y + b, b)``. The conv before absorbs ``s * y + b``, so three passes over the map become one.
    """

    def __init__(self, bound: float, upper: bool) -> None:
        super().__init__()
        self.bound = bound
        self.upper = upper

    def forward(self, x: Tensor) -> Tensor:
        # In place: x is the fresh output of the conv before, read by nothing else.
        return x.clamp_(max=self.bound) if self.upper else x.clamp_(min=self.bound)

    def extra_repr(self) -> str:
        return f"{'max' if self.upper else 'min'}={self.bound}"


class MaxOf2x2(nn.Module):
    """``MaxPool2d(2, stride=1)`` as the maximum of shifted views: the same values, in two elementwise passes.

    oneDNN's channels-last max-pool (which also writes indices in eager mode) took 4.6 of D-FINE-N's 69 ms at
    640x640 on a 2-core CPU; two ``maximum`` calls take a fraction of it.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():  # runtimes have a fast max-pool, and Slice was slower in OpenVINO
            return F.max_pool2d(x, kernel_size=2, stride=1, ceil_mode=True)
        rows = torch.maximum(x[:, :, :-1], x[:, :, 1:])
        return torch.maximum(rows[..., :-1], rows[..., 1:])


class ConcatConv(nn.Module):
    """A deployed :class:`ConvBNAct` over ``cat([a, b], dim=1)``, computed as ``act(conv_a(a) + conv_b(b))``.

    The convolution is linear in its input channels, so the concatenation need not be written. In the stem it
    is a 13 MB channel-interleaving copy at a 640x640 input that took 4.7 of D-FINE-N's 72 ms on a 2-core CPU.
    """

    def __init__(self, block: ConvBNAct, split: int) -> None:
        super().__init__()
        block.convert_to_deploy()
        conv = block.conv
        self.first = conv_with_bias_like(conv, conv.weight[:, :split], conv.bias)
        self.second = conv_with_bias_like(conv, conv.weight[:, split:], None)  # the sum needs one bias
        self.act = block.act  # ReLU or ClampAt, both in place

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        out = self.first(first)
        out += self.second(second)  # in place: one fresh map fewer per call
        return self.act(out)
