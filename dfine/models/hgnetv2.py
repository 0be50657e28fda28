"""HGNetv2 (PP-HGNetV2), the CNN backbone of D-FINE, in variants B0 to B6.

A stem (stride 4) is followed by four stages; stages 2-4 start with a stride-2 depth-wise conv, so the
stages return feature maps at strides 4, 8, 16 and 32. Each stage stacks HG blocks: a chain of convs whose
outputs are all concatenated and squeezed back by two 1x1 convs. Attribute names follow the original D-FINE
implementation so that its checkpoints (and the ImageNet-pretrained ``PPHGNetV2_*_stage1.pth`` files) load
unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfine.config.registry import MODELS, ConfigError
from dfine.models.backbone_deploy import ClampAt, ConcatConv, MaxOf2x2
from dfine.models.common import conv_with_bias_like, fold_norm_into_conv, freeze_batch_norm

__all__ = ["VARIANTS", "HGNetv2"]

logger = logging.getLogger(__name__)

_WEIGHTS_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0/PPHGNetV2_{name}_stage1.pth"


class _Stage(NamedTuple):
    in_channels: int
    mid_channels: int
    out_channels: int
    num_blocks: int
    downsample: bool
    light_block: bool
    kernel_size: int
    layers_per_block: int


class _Variant(NamedTuple):
    stem_channels: tuple[int, int, int]  # input, middle, output
    stages: tuple[_Stage, _Stage, _Stage, _Stage]


def _variant(stem: tuple[int, int, int], *stages: tuple) -> _Variant:
    return _Variant(stem, tuple(_Stage(*stage) for stage in stages))  # type: ignore[arg-type]


# Stage columns: in, mid, out channels, blocks, downsample, light (depth-wise) convs, kernel, convs per block.
VARIANTS: dict[str, _Variant] = {
    "B0": _variant(
        (3, 16, 16),
        (16, 16, 64, 1, False, False, 3, 3),
        (64, 32, 256, 1, True, False, 3, 3),
        (256, 64, 512, 2, True, True, 5, 3),
        (512, 128, 1024, 1, True, True, 5, 3),
    ),
    "B1": _variant(
        (3, 24, 32),
        (32, 32, 64, 1, False, False, 3, 3),
        (64, 48, 256, 1, True, False, 3, 3),
        (256, 96, 512, 2, True, True, 5, 3),
        (512, 192, 1024, 1, True, True, 5, 3),
    ),
    "B2": _variant(
        (3, 24, 32),
        (32, 32, 96, 1, False, False, 3, 4),
        (96, 64, 384, 1, True, False, 3, 4),
        (384, 128, 768, 3, True, True, 5, 4),
        (768, 256, 1536, 1, True, True, 5, 4),
    ),
    "B3": _variant(
        (3, 24, 32),
        (32, 32, 128, 1, False, False, 3, 5),
        (128, 64, 512, 1, True, False, 3, 5),
        (512, 128, 1024, 3, True, True, 5, 5),
        (1024, 256, 2048, 1, True, True, 5, 5),
    ),
    "B4": _variant(
        (3, 32, 48),
        (48, 48, 128, 1, False, False, 3, 6),
        (128, 96, 512, 1, True, False, 3, 6),
        (512, 192, 1024, 3, True, True, 5, 6),
        (1024, 384, 2048, 1, True, True, 5, 6),
    ),
    "B5": _variant(
        (3, 32, 64),
        (64, 64, 128, 1, False, False, 3, 6),
        (128, 128, 512, 2, True, False, 3, 6),
        (512, 256, 1024, 5, True, True, 5, 6),
        (1024, 512, 2048, 2, True, True, 5, 6),
    ),
    "B6": _variant(
        (3, 48, 96),
        (96, 96, 192, 2, False, False, 3, 6),
        (192, 192, 512, 3, True, False, 3, 6),
        (512, 384, 1024, 6, True, True, 5, 6),
        (1024, 768, 2048, 3, True, True, 5, 6),
    ),
}
_STAGE_STRIDES = (4, 8, 16, 32)


def _flat_in_memory_order(x: Tensor) -> Tensor | None:
    """A 1-D view of ``x``'s elements in memory order, or None when ``x`` is neither NCHW nor NHWC dense."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC is contiguous in this order
    return None


class _ScalarAffine(torch.autograd.Function):
    """``scale * x + bias`` for scalar ``scale`` / ``bias`` [1] in one pass each way.

    Autograd of the two-op form writes ``scale * x``, then the sum, and in backward materialises
    ``grad * x`` only to reduce it to one number; here the forward is one ``addcmul`` and the scale's
    gradient a dot product over the memory (values ~1e-7 apart: one rounding instead of two, another
    summation order).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale)
        return torch.addcmul(bias, x, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, scale = ctx.saved_tensors
        grad_x = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            flat_grad, flat_x = _flat_in_memory_order(grad), _flat_in_memory_order(x)
            same_layout = (
                flat_grad is not None and flat_x is not None and grad.stride() == x.stride()
            ) and grad.dtype == x.dtype
            grad_scale = (flat_grad @ flat_x if same_layout else (grad * x).sum()).reshape(1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum().reshape(1)
        return grad_x, grad_scale, grad_bias


class LearnableAffineBlock(nn.Module):
    """``scale * x + bias`` with two learned scalars (keys ``scale``, ``bias``, each of shape [1])."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]))
        self.bias = nn.Parameter(torch.tensor([bias]))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.scale.requires_grad:
            return _ScalarAffine.apply(x, self.scale, self.bias)
        return self.scale * x + self.bias  # the original's two ops: eval outputs stay bit-identical


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU -> optional learnable affine; keys ``conv``, ``bn``, ``lab``.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: square kernel k; padding is ``(k - 1) // 2`` (so a 2x2 kernel shrinks the map by one
            pixel, which the stem pads back beforehand).
        stride: conv stride.
        groups: conv groups.
        use_act: apply ReLU (and then the affine block when ``use_lab``).
        use_lab: add a :class:`LearnableAffineBlock` after the ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_act: bool = True,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=padding, groups=groups, bias=False
        )
        self.bn: nn.Module = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU() if use_act else nn.Identity()
        self.lab = LearnableAffineBlock() if use_act and use_lab else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))

    def convert_to_deploy(self) -> None:
        """Fold the (frozen or running) BatchNorm statistics, and the affine block, into the conv; idempotent.

        Outputs move by float rounding only (the products are formed in another order).
        """
        if isinstance(self.bn, nn.Identity):
            return
        weight, bias = fold_norm_into_conv(self.conv, self.bn)
        if isinstance(self.lab, LearnableAffineBlock):
            scale, shift = self.lab.scale.detach().item(), self.lab.bias.detach().item()
            weight, bias = weight * scale, bias * scale + shift
            self.act = ClampAt(shift, upper=scale < 0)
            self.lab = nn.Identity()
        elif isinstance(self.act, nn.ReLU):
            self.act = nn.ReLU(inplace=True)  # on the conv's fresh output
        self.conv = conv_with_bias_like(self.conv, weight, bias)
        self.bn = nn.Identity()


class LightConvBNAct(nn.Module):
    """A 1x1 conv (no activation) then a k x k depth-wise conv with activation; keys ``conv1``, ``conv2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, use_lab: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(out_channels, out_channels, kernel_size, groups=out_channels, use_lab=use_lab)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """Stride-4 stem: a stride-2 conv, then a max-pool branch beside two 2x2 convs, merged by a stride-2 conv.

    [B, 3, H, W] -> [B, C_out, ceil(H / 4), ceil(W / 4)].
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, use_lab: bool = False) -> None:
        super().__init__()
        self.stem1 = ConvBNAct(in_channels, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid_channels, mid_channels // 2, 2, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid_channels // 2, mid_channels, 2, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid_channels * 2, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid_channels, out_channels, 1, use_lab=use_lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)
        self.merge: ConcatConv | None = None  # set by convert_to_deploy, in place of stem3

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(self.stem1(x), (0, 1, 0, 1))  # 2x2 kernels shrink by one; pad right/bottom to keep the size
        conv_branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        if self.merge is not None:
            return self.stem4(self.merge(self.pool(x), conv_branch))
        x = torch.cat([self.pool(x), conv_branch], dim=1)
        return self.stem4(self.stem3(x))

    def convert_to_deploy(self) -> None:
        """Swap the max-pool for :class:`MaxOf2x2` (equal values) and the merge for a :class:`ConcatConv`."""
        if self.merge is None:
            self.pool = MaxOf2x2()
            self.merge = ConcatConv(self.stem3, split=self.stem2b.conv.out_channels)
            del self.stem3


class HGBlock(nn.Module):
    """Chain of ``num_layers`` convs; input and every conv output are concatenated and squeezed to C_out.

    The squeeze is two 1x1 convs (to C_out / 2, then C_out). Blocks after the first of a stage add their input
    (``residual``). Keys: ``layers.{i}``, ``aggregation.0``, ``aggregation.1``.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        num_layers: int,
        kernel_size: int = 3,
        residual: bool = False,
        light_block: bool = False,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for index in range(num_layers):
            channels = in_channels if index == 0 else mid_channels
            if light_block:
                layer: nn.Module = LightConvBNAct(channels, mid_channels, kernel_size, use_lab=use_lab)
            else:
                layer = ConvBNAct(channels, mid_channels, kernel_size, use_lab=use_lab)
            self.layers.append(layer)
        concatenated = in_channels + num_layers * mid_channels
        self.aggregation = nn.Sequential(
            ConvBNAct(concatenated, out_channels // 2, 1, use_lab=use_lab),
            ConvBNAct(out_channels // 2, out_channels, 1, use_lab=use_lab),
        )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features[-1]))
        out = self.aggregation(torch.cat(features, dim=1))
        return out + x if self.residual else out


class HGStage(nn.Module):
    """Optional stride-2 depth-wise conv, then ``num_blocks`` HG blocks; keys ``downsample``, ``blocks``."""

    def __init__(self, spec: _Stage, use_lab: bool = False) -> None:
        super().__init__()
        if spec.downsample:
            self.downsample: nn.Module = ConvBNAct(
                spec.in_channels,
                spec.in_channels,
                3,
                stride=2,
                groups=spec.in_channels,
                use_act=False,
                use_lab=use_lab,
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(
                HGBlock(
                    spec.in_channels if index == 0 else spec.out_channels,
                    spec.mid_channels,
                    spec.out_channels,
                    spec.layers_per_block,
                    kernel_size=spec.kernel_size,
                    residual=index > 0,
                    light_block=spec.light_block,
                    use_lab=use_lab,
                )
                for index in range(spec.num_blocks)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


@MODELS.register()
class HGNetv2(nn.Module):
    """HGNetv2 backbone returning the feature maps of the stages in ``return_idx``.

    Args:
        name: variant, one of ``B0`` ... ``B6`` (D-FINE uses B0 for N and S, B2 for M, B4 for L, B5 for X).
        use_lab: add a learnable scale and bias after every activation (the N, S and M models do).
        return_idx: stages (0..3, increasing) whose outputs are returned; strides 4, 8, 16, 32.
        freeze_stem_only: with ``freeze_at >= 0``, freeze only the stem; otherwise also stages 0..freeze_at.
        freeze_at: -1 trains everything; >= 0 freezes the stem parameters (and stages, see above). Frozen
            parameters get ``requires_grad = False``; BatchNorm statistics still update (see ``freeze_norm``).
        freeze_norm: replace every BatchNorm by :class:`FrozenBatchNorm2d` (fixed statistics and affine).
        pretrained: local path to a weights file (a state dict, or ``{"model": state_dict}``; keys may carry a
            ``backbone.`` prefix). None (or False) starts from random weights. Weights are never downloaded.

    Raises:
        ValueError: unknown ``name``, bad ``return_idx``, or weights whose keys or shapes do not match.
        FileNotFoundError: ``pretrained`` names a missing file.
    """

    def __init__(
        self,
        name: str,
        use_lab: bool = False,
        return_idx: Sequence[int] = (1, 2, 3),
        freeze_stem_only: bool = True,
        freeze_at: int = 0,
        freeze_norm: bool = True,
        pretrained: str | Path | None = None,
    ) -> None:
        super().__init__()
        if name not in VARIANTS:
            raise ConfigError(f"unknown HGNetv2 variant {name!r}; choose one of {', '.join(VARIANTS)}.")
        return_idx = list(return_idx)
        if (
            not return_idx
            or any(i not in range(4) for i in return_idx)
            or return_idx != sorted(set(return_idx))
        ):
            raise ConfigError(
                f"HGNetv2 return_idx {return_idx} must list distinct stage indices 0..3 in increasing order, "
                "e.g. [1, 2, 3] (strides 8, 16, 32)."
            )
        variant = VARIANTS[name]
        self.name = name
        self.use_lab = use_lab
        self.return_idx = return_idx
        self._stage_channels = [stage.out_channels for stage in variant.stages]

        self.stem = StemBlock(*variant.stem_channels, use_lab=use_lab)
        self.stages = nn.ModuleList(HGStage(spec, use_lab=use_lab) for spec in variant.stages)

        if freeze_norm:
            freeze_batch_norm(self)
        if pretrained is True:
            raise ConfigError(
                "HGNetv2 pretrained must be a local file path or None, not True: dfine never downloads "
                f"weights. Download {_WEIGHTS_URL.format(name=name)} and set pretrained to its path."
            )
        if pretrained:
            self.load_pretrained(pretrained)
        if freeze_at >= 0:
            self.stem.requires_grad_(False)
            if not freeze_stem_only:
                for stage in self.stages[: freeze_at + 1]:
                    stage.requires_grad_(False)

    @property
    def out_channels(self) -> list[int]:
        """Channels of the returned feature maps, in ``return_idx`` order."""
        return [self._stage_channels[i] for i in self.return_idx]

    @property
    def out_strides(self) -> list[int]:
        """Strides (input pixels per feature-map cell) of the returned feature maps."""
        return [_STAGE_STRIDES[i] for i in self.return_idx]

    def forward(self, images: Tensor) -> list[Tensor]:
        """Extract features.

        Args:
            images: [B, 3, H, W].

        Returns:
            One [B, C_i, ceil(H / s_i), ceil(W / s_i)] map per ``return_idx`` entry (channels
            ``out_channels``, strides ``out_strides``); for H and W multiples of 32, exactly H / s_i, W / s_i.
        """
        x = self.stem(images)
        outputs = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.return_idx:
                outputs.append(x)
        return outputs

    def convert_to_deploy(self) -> None:
        """Fold every BatchNorm (frozen or not) into its conv, using the current running statistics."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "convert_to_deploy"):
                module.convert_to_deploy()

    def load_pretrained(self, path: str | Path) -> None:
        """Load weights from a local file (see the class docstring for the accepted layouts).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: missing, unexpected or mis-shaped keys (all listed).
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"HGNetv2 pretrained weights not found at '{path}'. dfine never downloads weights: the "
                f"original D-FINE's ImageNet weights for {self.name} are "
                f"{_WEIGHTS_URL.format(name=self.name)}; download that file and set pretrained to its local "
                "path, or set pretrained: null to train from scratch."
            )
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        state = _extract_state_dict(checkpoint, file)
        self._check_keys(state, file)
        self.load_state_dict(state, strict=False)  # every key was checked above; counters may be absent
        logger.info("loaded HGNetv2 %s weights from %s", self.name, file)

    def _check_keys(self, state: Mapping[str, Tensor], file: Path) -> None:
        own = self.state_dict()
        counter = "num_batches_tracked"  # a step counter: absent in frozen-norm files, harmless either way
        missing = [k for k in own if k not in state and not k.endswith(counter)]
        unexpected = [k for k in state if k not in own and not k.endswith(counter)]
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ]
        problems = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                problems.append(f"{title}: {shown}")
        if problems:
            raise ValueError(
                f"weights in '{file}' do not fit HGNetv2 {self.name} (use_lab={self.use_lab}); "
                + "; ".join(problems)
                + ". Check that the file is for this variant and use_lab setting."
            )


def _extract_state_dict(checkpoint: Any, file: Path) -> dict[str, Tensor]:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"'{file}' holds no state dict (expected {{name: tensor}} or {{'model': {{...}}}}).")
    prefix = "backbone."
    if not any(k.startswith("stem.") for k in state) and any(k.startswith(prefix) for k in state):
        # a whole-detector checkpoint (backbone.*, encoder.*, decoder.*): keep the backbone's part
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)
