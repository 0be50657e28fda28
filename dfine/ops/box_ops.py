"""Box format conversions and the IoU / GIoU of paired boxes.

Boxes are float tensors ``[..., 4]``; ``cxcywh`` is centre x, centre y, width, height and ``xyxy`` is
left, top, right, bottom, both in the same units (normalised 0..1 or pixels). Every function is pure and
handles ``N = 0``. Where nothing needs the clamp of :func:`box_cxcywh_to_xyxy` (ground truth,
post-processing), callers use ``torchvision.ops.box_convert``, whose arithmetic is the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AREA_FLOOR", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "paired_iou_and_giou"]

# Denominators of IoU/GIoU are clamped to this floor (not offset by it): results are bit-identical to the
# unguarded formula for any real box, and two zero-area boxes give IoU = GIoU = 0 instead of 0/0 = NaN.
AREA_FLOOR = 1e-9


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` cxcywh -> ``[..., 4]`` xyxy (same units), negative widths and heights counted as zero.

    Decoded D-FINE boxes can come out inverted early in training; like the original criterion and matcher,
    such a box becomes a point box instead of an xyxy box with x1 < x0, which would break IoU and GIoU (the
    clamp also stops gradients through an inverted size).
    """
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w.clamp(min=0.0), 0.5 * h.clamp(min=0.0)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy -> ``[..., 4]`` cxcywh (same units)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def paired_iou_and_giou(pred_xyxy: Tensor, target_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and generalised IoU (https://giou.stanford.edu/) of paired boxes, broadcasting over leading dims.

    Args:
        pred_xyxy: [..., 4] predicted boxes, xyxy (x1 >= x0, y1 >= y0).
        target_xyxy: [..., 4] target boxes, xyxy, broadcastable against ``pred_xyxy``.

    Returns:
        ``(iou, giou)``, each of the broadcast shape without the last dimension; IoU in 0..1, GIoU in -1..1.
    """
    pred_area = (pred_xyxy[..., 2] - pred_xyxy[..., 0]) * (pred_xyxy[..., 3] - pred_xyxy[..., 1])
    target_area = (target_xyxy[..., 2] - target_xyxy[..., 0]) * (target_xyxy[..., 3] - target_xyxy[..., 1])
    top_left = torch.max(pred_xyxy[..., :2], target_xyxy[..., :2])
    bottom_right = torch.min(pred_xyxy[..., 2:], target_xyxy[..., 2:])
    overlap = (bottom_right - top_left).clamp(min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = pred_area + target_area - intersection
    iou = intersection / union.clamp(min=AREA_FLOOR)
    hull_top_left = torch.min(pred_xyxy[..., :2], target_xyxy[..., :2])
    hull_bottom_right = torch.max(pred_xyxy[..., 2:], target_xyxy[..., 2:])
    hull_size = (hull_bottom_right - hull_top_left).clamp(min=0)
    hull = hull_size[..., 0] * hull_size[..., 1]
    return iou, iou - (hull - union) / hull.clamp(min=AREA_FLOOR)
