"""Layers shared by the backbone and the encoder: activations by name, conv + BatchNorm, frozen BatchNorm.

BatchNorm folding lives here too, so every ``convert_to_deploy()`` in the package uses the same arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATION_NAMES",
    "ConvNormLayer",
    "FrozenBatchNorm2d",
    "conv_with_bias_like",
    "fold_norm_into_conv",
    "freeze_batch_norm",
    "get_activation",
    "norm_scale_shift",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
ACTIVATION_NAMES: tuple[str, ...] = tuple(_ACTIVATIONS)


def get_activation(name: str | None) -> nn.Module:
    """Activation module for a config name.

    Args:
        name: ``'relu'``, ``'silu'`` or ``'gelu'`` (case-insensitive), or None for no activation.

    Returns:
        A fresh module (``nn.Identity`` for None).

    Raises:
        ValueError: unknown name.
    """
    if name is None:
        return nn.Identity()
    if not isinstance(name, str) or name.lower() not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; use one of {', '.join(repr(n) for n in ACTIVATION_NAMES)} "
            "or None (no activation)."
        )
    return _ACTIVATIONS[name.lower()]()


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters never change.

    All four tensors are buffers, so optimisers never see them and train mode does not update them. The
    state-dict keys are ``weight``, ``bias``, ``running_mean`` and ``running_var``, without
    ``num_batches_tracked`` (as in the original D-FINE); a ``num_batches_tracked`` entry in a state dict saved
    from an unfrozen model is dropped on load, so such checkpoints load with ``strict=True``.

    Args:
        num_features: number of channels C of the [B, C, H, W] input.
        eps: added to the variance before the square root.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batch_norm(cls, norm: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        """A frozen copy of ``norm``'s current affine parameters and running statistics."""
        frozen = cls(norm.num_features, norm.eps).to(device=norm.running_mean.device)
        with torch.no_grad():
            frozen.weight.copy_(norm.weight)
            frozen.bias.copy_(norm.bias)
            frozen.running_mean.copy_(norm.running_mean)
            frozen.running_var.copy_(norm.running_var)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` [B, C, H, W] with the stored statistics; returns [B, C, H, W]."""
        scale, shift = norm_scale_shift(self)
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def norm_scale_shift(norm: nn.BatchNorm2d | FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` [C] such that eval-mode ``norm(x) == x * scale + shift``."""
    if norm.running_mean is None or norm.running_var is None or norm.weight is None or norm.bias is None:
        raise ValueError(f"{norm} has no running statistics or no affine parameters, so it cannot be folded.")
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    return scale, shift


def fold_norm_into_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d | FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Kernel and bias of one conv equal to ``norm(conv(x))`` in eval mode.

    Returns:
        ``(weight [C_out, C_in / groups, k, k], bias [C_out])``, detached.
    """
    with torch.no_grad():
        scale, shift = norm_scale_shift(norm)
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight.detach(), bias.detach()


def conv_with_bias_like(conv: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``conv``'s geometry, weight [C_out, C_in / g, k, k] and bias [C_out] (or none).

    C_in comes from ``weight``, so a slice of ``conv``'s input channels makes a conv over those channels only.
    """
    fused = nn.Conv2d(
        weight.shape[1] * conv.groups,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    return fused


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace each ``nn.BatchNorm2d`` in ``module`` by a :class:`FrozenBatchNorm2d` with its current values.

    Returns:
        ``module`` itself (changed in place), or the frozen replacement when ``module`` is a BatchNorm2d.
    """
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        replacement = freeze_batch_norm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


class ConvNormLayer(nn.Module):
    """Conv2d (no bias by default) -> BatchNorm2d -> activation; the encoder's basic layer.

    State-dict keys: ``conv.weight``, ``norm.*``; after :meth:`convert_to_deploy` (BatchNorm folded into a
    biased conv) ``conv_bn_fused.weight`` and ``conv_bn_fused.bias``, the names the original uses.

    Args:
        in_channels: C_in of the [B, C_in, H, W] input.
        out_channels: C_out of the output.
        kernel_size: square kernel size k.
        stride: conv stride; with the default padding the output is [B, C_out, ceil(H / s), ceil(W / s)].
        groups: conv groups (``out_channels`` for a depth-wise conv).
        padding: conv padding; None means ``(k - 1) // 2``.
        bias: give the conv its own bias (BatchNorm follows, so the original never does).
        act: activation name (see :func:`get_activation`), None for none.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        padding: int | None = None,
        bias: bool = False,
        act: str | None = None,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=padding, groups=groups, bias=bias
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = get_activation(act)
        self.conv_bn_fused: nn.Conv2d | None = None

    @property
    def deployed(self) -> bool:
        return self.conv_bn_fused is not None

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H', W']."""
        if self.conv_bn_fused is not None:
            return self.act(self.conv_bn_fused(x))
        return self.act(self.norm(self.conv(x)))

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv this layer equals in eval mode (before the activation)."""
        if self.conv_bn_fused is not None:
            return self.conv_bn_fused.weight.detach(), self.conv_bn_fused.bias.detach()
        return fold_norm_into_conv(self.conv, self.norm)

    def convert_to_deploy(self) -> None:
        """Fold the BatchNorm into the conv (eval-mode statistics); calling it twice is harmless."""
        if self.conv_bn_fused is not None:
            return
        weight, bias = self.equivalent_kernel_bias()
        self.conv_bn_fused = conv_with_bias_like(self.conv, weight, bias)
        del self.conv
        del self.norm
