"""Box format conversions and IoU maths.

Boxes are float tensors ``[..., 4]``; ``cxcywh`` is centre x, centre y, width, height and ``xyxy`` is
left, top, right, bottom, both in the same units (normalised 0..1 or pixels). Every function is pure and
handles ``N = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "elementwise_generalized_box_iou",
    "generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` cxcywh -> ``[..., 4]`` xyxy (same units).

    Negative widths and heights count as zero (as in the original D-FINE), so an inverted FDR prediction
    becomes a point box instead of an xyxy box with x1 < x0, which would break IoU and GIoU.
    """
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w.clamp(min=0.0), 0.5 * h.clamp(min=0.0)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy -> ``[..., 4]`` cxcywh (same units)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def _area(boxes_xyxy: Tensor) -> Tensor:
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of two sets of xyxy boxes.

    Args:
        boxes1: [N, 4] xyxy.
        boxes2: [M, 4] xyxy.
        eps: added to the union (0 keeps the original D-FINE numerics; the losses pass a small value).

    Returns:
        ``(iou, union)``, each [N, M].
    """
    area1, area2 = _area(boxes1), _area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / (union + eps), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> Tensor:
    """Pairwise generalised IoU (https://giou.stanford.edu/) of xyxy boxes.

    Args:
        boxes1: [N, 4] xyxy with x1 >= x0, y1 >= y0.
        boxes2: [M, 4] xyxy.
        eps: added to denominators so zero-area boxes stay finite.

    Returns:
        [N, M] GIoU in -1..1.
    """
    iou, union = box_iou(boxes1, boxes2, eps)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> Tensor:
    """GIoU of matching pairs: ``boxes1[i]`` with ``boxes2[i]``.

    Args:
        boxes1: [N, 4] xyxy.
        boxes2: [N, 4] xyxy.

    Returns:
        [N] GIoU, the diagonal of :func:`generalized_box_iou` without the [N, N] matrix.
    """
    area1, area2 = _area(boxes1), _area(boxes2)
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / (hull + eps)
