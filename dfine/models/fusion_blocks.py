"""Conv blocks of the hybrid encoder's cross-scale fusion: RepVGG, CSP, RepNCSPELAN4 and SCDown.

Every block has a ``convert_to_deploy()`` (RepVGG's two branches merged into one 3x3 conv, BatchNorm folded
into the convs), equal to the training form in eval mode. Attribute names follow the original implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfine.config.registry import ConfigError
from dfine.models.common import ConvNormLayer, get_activation

__all__ = ["CSPLayer", "RepNCSPELAN4", "RepVGGBlock", "SCDown"]


class RepVGGBlock(nn.Module):
    """3x3 conv-BN plus 1x1 conv-BN, summed, then the activation; one 3x3 conv once deployed.

    Keys: ``conv1.*`` (3x3 branch), ``conv2.*`` (1x1 branch); deployed: ``conv.weight``, ``conv.bias``.

    Args:
        in_channels: C_in of the [B, C_in, H, W] input.
        out_channels: C_out of the [B, C_out, H, W] output.
        act: activation name, or None.
    """

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "relu") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv1 = ConvNormLayer(in_channels, out_channels, 3, 1, padding=1)
        self.conv2 = ConvNormLayer(in_channels, out_channels, 1, 1, padding=0)
        self.act = get_activation(act)
        self.conv: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def convert_to_deploy(self) -> None:
        """Merge both branches (eval-mode BatchNorm statistics) into one biased 3x3 conv; idempotent."""
        if self.conv is not None:
            return
        kernel3, bias3 = self.conv1.equivalent_kernel_bias()
        kernel1, bias1 = self.conv2.equivalent_kernel_bias()
        merged = nn.Conv2d(
            self.in_channels, self.out_channels, 3, 1, padding=1, device=kernel3.device, dtype=kernel3.dtype
        )
        with torch.no_grad():
            merged.weight.copy_(kernel3 + F.pad(kernel1, [1, 1, 1, 1]))  # a 1x1 kernel is a centred 3x3 one
            merged.bias.copy_(bias3 + bias1)
        self.conv = merged
        del self.conv1
        del self.conv2


class CSPLayer(nn.Module):
    """Cross-stage partial layer: ``conv3(bottlenecks(conv1(x)) + conv2(x))`` with RepVGG bottlenecks.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        num_blocks: RepVGG blocks in the bottleneck path.
        expansion: hidden width ``int(out_channels * expansion)``; ``conv3`` is identity if equal to C_out.
        bias: conv biases (off in D-FINE).
        act: activation name.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 3,
        expansion: float = 1.0,
        bias: bool = False,
        act: str | None = "silu",
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*(RepVGGBlock(hidden, hidden, act=act) for _ in range(num_blocks)))
        if hidden != out_channels:
            self.conv3: nn.Module = ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
        else:
            self.conv3 = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class RepNCSPELAN4(nn.Module):
    """CSP-ELAN block (from YOLOv9): split, two chained CSP branches, concatenate all four parts, 1x1 conv.

    ``cv1`` maps C_in to ``split_channels`` and splits it in two halves; ``cv2`` and ``cv3`` (each a CSP layer
    and a 3x3 conv of ``branch_channels``) run one after the other on the second half; ``cv4`` maps the
    concatenation of both halves and both branch outputs to C_out.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        split_channels: output of ``cv1`` (even).
        branch_channels: width of ``cv2`` and ``cv3``.
        num_blocks: RepVGG blocks per CSP layer.
        bias: conv biases (off in D-FINE).
        act: activation name.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        split_channels: int,
        branch_channels: int,
        num_blocks: int = 3,
        bias: bool = False,
        act: str | None = "silu",
    ) -> None:
        super().__init__()
        if split_channels % 2 != 0:
            raise ConfigError(f"RepNCSPELAN4 split_channels must be even, got {split_channels}.")
        self.half = split_channels // 2
        self.cv1 = ConvNormLayer(in_channels, split_channels, 1, 1, bias=bias, act=act)
        self.cv2 = nn.Sequential(
            CSPLayer(self.half, branch_channels, num_blocks, 1.0, bias=bias, act=act),
            ConvNormLayer(branch_channels, branch_channels, 3, 1, bias=bias, act=act),
        )
        self.cv3 = nn.Sequential(
            CSPLayer(branch_channels, branch_channels, num_blocks, 1.0, bias=bias, act=act),
            ConvNormLayer(branch_channels, branch_channels, 3, 1, bias=bias, act=act),
        )
        self.cv4 = ConvNormLayer(split_channels + 2 * branch_channels, out_channels, 1, 1, bias=bias, act=act)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H, W]."""
        parts = list(self.cv1(x).split((self.half, self.half), dim=1))
        parts.append(self.cv2(parts[-1]))
        parts.append(self.cv3(parts[-1]))
        return self.cv4(torch.cat(parts, dim=1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling (from YOLOv10): 1x1 conv-BN, then a strided depth-wise conv-BN.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: depth-wise kernel k.
        stride: depth-wise stride; [B, C_in, H, W] -> [B, C_out, ceil(H / s), ceil(W / s)] for k = 3, s = 2.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.cv1 = ConvNormLayer(in_channels, out_channels, 1, 1)
        self.cv2 = ConvNormLayer(out_channels, out_channels, kernel_size, stride, groups=out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))
