"""Model size figures: parameter counts and GFLOPs, counted the way the D-FINE paper reports them.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts one multiply-add as 2 FLOPs
and only the ops it has formulas for: convolutions and matrix products (``mm``, ``addmm``, ``bmm``, attention
kernels). That is the convention of the paper's table (the original measured with ``calflops`` on the
``deploy()`` model and quotes its FLOPs, = 2 x MACs): at 640x640 our counts are N 7.3, S 25.5, M 57.0,
L 91.6 and X 203.1 GFLOPs against the paper's 7 / 25 / 57 / 91 / 202.

Not counted: element-wise work (activations, norms, softmax, additions) and, in the decoder, the bilinear
sampling of the deformable attention (``grid_sample``) and the distribution integral's matrix-vector product
(``aten.mv``). Their linear layers (sampling offsets, attention weights) are counted. ``extra_ops=True`` adds
the sampling (4 multiply-adds per sampled value) and ``mv``; for N at 640 that is about 0.01 GFLOPs. After
``deploy()`` the deformable attention sums its weighted samples as a product with a row of ones, which the
counter sees as ``bmm`` (0.003 GFLOPs for N at 640).

Example::

    model = dfine.build_model(dfine.load_config("configs/dfine/dfine_hgnetv2_n_coco.yml"))
    count_parameters(model)             # 3782693
    count_gflops(model.deploy())        # 7.32
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_gflops", "count_parameters", "flop_breakdown"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (buffers such as BatchNorm statistics and anchors excluded).

    Args:
        model: any module; shared parameters are counted once.
        trainable_only: count only parameters with ``requires_grad`` (frozen backbone parts left out).

    Returns:
        The count, e.g. 3,782,693 for D-FINE-N (the same as the original implementation).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _grid_sample_flops(
    input_shape: Sequence[int], grid_shape: Sequence[int], *args: Any, out_shape: Sequence[int], **kwargs: Any
) -> int:
    # Bilinear: each output value mixes 4 neighbours, 4 multiply-adds = 8 FLOPs (nearest mode is a read).
    interpolation_mode = args[0] if args else kwargs.get("interpolation_mode", 0)
    return 8 * math.prod(out_shape) if interpolation_mode == 0 else 0


def _mv_flops(matrix_shape: Sequence[int], vector_shape: Sequence[int], *, out_shape: Sequence[int]) -> int:
    return 2 * matrix_shape[0] * matrix_shape[1]


def _cpu_attention_flops(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    # The two matrix products of the fused CPU kernel that the deployed decoder's self-attention runs; the
    # CUDA kernels have formulas in torch, this one does not.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Always counted: matrix products torch's counter does not know.
_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
_EXTRA_FORMULAS = {
    torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
    torch.ops.aten.mv: _mv_flops,
}


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or any(int(side) <= 0 or int(side) % 32 for side in image_size):
        raise ValueError(
            f"image_size must be (H, W), positive multiples of 32 (the backbone's stride), got {image_size}"
        )
    return int(image_size[0]), int(image_size[1])


def flop_breakdown(
    model: nn.Module, image_size: Sequence[int] = (640, 640), extra_ops: bool = False
) -> dict[str, int]:
    """FLOPs per ATen op of one eval forward pass at batch 1 (1 multiply-add = 2 FLOPs).

    Args:
        model: a detector taking a [1, 3, H, W] float image in 0..1; run in eval mode (its training flag is
            restored afterwards), under ``torch.no_grad``, on its own device and dtype.
        image_size: (H, W) in pixels, multiples of 32.
        extra_ops: also count ``grid_sample`` and ``mv`` (see the module docstring).

    Returns:
        ``{"aten.convolution": flops, "aten.addmm": flops, ...}``, ops without a count left out.

    Raises:
        ValueError: ``image_size`` is not two positive multiples of 32.
    """
    height, width = _check_image_size(image_size)
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    counter = FlopCounterMode(
        display=False, custom_mapping={**_FORMULAS, **(_EXTRA_FORMULAS if extra_ops else {})}
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(images)
    finally:
        model.train(was_training)
    return {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items() if flops}


def count_gflops(model: nn.Module, image_size: Sequence[int] = (640, 640), extra_ops: bool = False) -> float:
    """GFLOPs (10^9, 1 multiply-add = 2 FLOPs) of one eval forward pass at batch 1, as in the D-FINE paper.

    Count on the ``deploy()`` form to match the paper (BatchNorm folded, re-parameterised branches merged);
    the training form runs a few extra 1x1 branches (+0.1% for N).

    Args:
        model: a detector taking a [1, 3, H, W] float image in 0..1 (see :func:`flop_breakdown`).
        image_size: (H, W) in pixels, multiples of 32.
        extra_ops: also count the deformable attention's bilinear sampling and ``mv``.

    Returns:
        GFLOPs, e.g. about 7.3 for D-FINE-N at 640x640.
    """
    return sum(flop_breakdown(model, image_size, extra_ops).values()) / 1e9
