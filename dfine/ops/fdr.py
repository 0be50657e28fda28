"""Fine-grained Distribution Refinement maths: the weighting function W(n), edge distances <-> boxes.

D-FINE predicts, for each of a box's four edges, a distribution over ``R = reg_max + 1`` bins. Bin ``n``
stands for the offset ``W(n)``; the expected offset (the integral) moves the edge away from the reference
box's edge, in units of the reference width (or height) divided by ``reg_scale``. All functions here run in
float32: the caller upcasts, because fp16 rounding of these offsets is what produces inverted boxes under AMP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dfine.ops.box_ops import box_xyxy_to_cxcywh

__all__ = [
    "box_to_distance",
    "distance_to_bins",
    "distance_to_box",
    "distribution_integral",
    "weighting_function",
]


def weighting_function(reg_max: int, up: Tensor, reg_scale: Tensor | float) -> Tensor:
    """The non-uniform bin values W(n), n = 0..reg_max.

    Bins are dense near 0 and sparse at the ends: ``W(n) = +-(step**k - 1)`` with ``step`` chosen so that the
    second-outermost bins reach ``+-up * reg_scale``; the outermost bins are ``+-2 * up * reg_scale``.

    Args:
        reg_max: number of intervals (even, >= 4).
        up: [1] upper-bound scale (D-FINE's ``up``, 0.5 by default).
        reg_scale: [1] tensor or float, curvature (D-FINE's ``reg_scale``).

    Returns:
        [reg_max + 1] bin values, increasing, symmetric around W(reg_max / 2) = 0, dtype of ``up``.
    """
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max must be an even integer >= 4, got {reg_max}")
    bound = (
        up.reshape(-1)[0].abs()
        * torch.as_tensor(reg_scale, dtype=up.dtype, device=up.device).reshape(-1)[0].abs()
    )
    step = (bound + 1) ** (2 / (reg_max - 2))
    exponents = torch.arange(1, reg_max // 2, dtype=up.dtype, device=up.device)
    right = step**exponents - 1  # [reg_max / 2 - 1]
    zero = torch.zeros(1, dtype=up.dtype, device=up.device)
    outer = (2 * bound).reshape(1)
    return torch.cat((-outer, -right.flip(0), zero, right, outer))


def distribution_integral(corner_logits: Tensor, project: Tensor) -> Tensor:
    """Expected edge offsets from per-edge bin logits.

    Args:
        corner_logits: [..., 4 * R] logits, edges ordered left, top, right, bottom.
        project: [R] bin values from :func:`weighting_function`.

    Returns:
        [..., 4] expected offsets, in reference-size / reg_scale units.
    """
    shape = corner_logits.shape[:-1]
    num_bins = corner_logits.shape[-1] // 4  # explicit, so that empty inputs reshape too
    probs = F.softmax(corner_logits.reshape(*shape, 4, num_bins), dim=-1)  # [..., 4, R]
    return (probs @ project.to(probs.dtype)).reshape(*shape, 4)


def _scalar(reg_scale: Tensor | float, like: Tensor) -> Tensor:
    """``|reg_scale|`` as a 0-d tensor, so a [1] tensor does not add a dimension to unbatched [4] inputs."""
    return torch.as_tensor(reg_scale, dtype=like.dtype, device=like.device).abs().reshape(())


def distance_to_box(ref: Tensor, distance: Tensor, reg_scale: Tensor | float) -> Tensor:
    """Decode per-edge offsets into boxes.

    Args:
        ref: [..., 4] reference boxes, cxcywh in 0..1.
        distance: [..., 4] left, top, right, bottom offsets beyond the reference's half-size, in units of
            ref w (or h) / reg_scale.
        reg_scale: curvature (> 0; its absolute value is used, as in D-FINE).

    Returns:
        [..., 4] boxes, cxcywh in 0..1.
    """
    scale = _scalar(reg_scale, ref)
    half = 0.5 * scale
    unit_w, unit_h = ref[..., 2] / scale, ref[..., 3] / scale
    x0 = ref[..., 0] - (half + distance[..., 0]) * unit_w
    y0 = ref[..., 1] - (half + distance[..., 1]) * unit_h
    x1 = ref[..., 0] + (half + distance[..., 2]) * unit_w
    y1 = ref[..., 1] + (half + distance[..., 3]) * unit_h
    return box_xyxy_to_cxcywh(torch.stack((x0, y0, x1, y1), dim=-1))


def distance_to_bins(
    distance: Tensor, reg_max: int, up: Tensor, reg_scale: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """Place continuous target offsets between two neighbouring bins (for the FGL loss).

    Args:
        distance: [...] target offsets (any shape; flattened).
        reg_max, up, reg_scale: as in :func:`weighting_function`.

    Returns:
        ``(left_index, weight_right, weight_left)``, each [numel] float: the left bin's index (fractional only
        at the upper clamp, ``reg_max - 0.1``), and linear-interpolation weights of the right and left bins.
        Offsets below W(0) put all weight on bin 0; above W(reg_max), all on the last bin.
    """
    values = weighting_function(reg_max, up, reg_scale)  # [R]
    flat = distance.reshape(-1)
    index = (values[None, :] <= flat[:, None]).sum(dim=1) - 1  # left neighbour, -1 below range, reg_max above
    inside = (index >= 0) & (index < reg_max)
    safe = index.clamp(0, reg_max - 1)
    left_value, right_value = values[safe], values[safe + 1]
    left_gap = (flat - left_value).abs()
    right_gap = (right_value - flat).abs()
    weight_right = torch.where(inside, left_gap / (left_gap + right_gap), torch.zeros_like(flat))
    weight_left = torch.where(inside, 1.0 - weight_right, torch.zeros_like(flat))
    below, above = index < 0, index >= reg_max
    weight_left = torch.where(below, torch.ones_like(flat), weight_left)
    weight_right = torch.where(above, torch.ones_like(flat), weight_right)
    left_index = index.to(flat.dtype)
    left_index = torch.where(below, torch.zeros_like(flat), left_index)
    left_index = torch.where(above, torch.full_like(flat, reg_max - 0.1), left_index)
    return left_index, weight_right, weight_left


def box_to_distance(
    ref: Tensor, boxes_xyxy: Tensor, reg_max: int, up: Tensor, reg_scale: Tensor | float, eps: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Target edge offsets of ``boxes_xyxy`` relative to ``ref``, as bin positions (inverse of decoding).

    Args:
        ref: [N, 4] reference boxes, cxcywh.
        boxes_xyxy: [N, 4] target boxes, xyxy, same units as ``ref``.
        reg_max, up, reg_scale: as in :func:`weighting_function`.
        eps: keeps the clamped bin position below ``reg_max``.

    Returns:
        ``(bin_position, weight_right, weight_left)``, each [N * 4], detached.
    """
    scale = _scalar(reg_scale, ref)
    unit_w = ref[:, 2] / scale + 1e-16
    unit_h = ref[:, 3] / scale + 1e-16
    half = 0.5 * scale
    distance = torch.stack(
        (
            (ref[:, 0] - boxes_xyxy[:, 0]) / unit_w - half,
            (ref[:, 1] - boxes_xyxy[:, 1]) / unit_h - half,
            (boxes_xyxy[:, 2] - ref[:, 0]) / unit_w - half,
            (boxes_xyxy[:, 3] - ref[:, 1]) / unit_h - half,
        ),
        dim=-1,
    )
    position, weight_right, weight_left = distance_to_bins(distance, reg_max, up, reg_scale)
    position = position.clamp(min=0, max=reg_max - eps)
    return position.detach(), weight_right.detach(), weight_left.detach()
