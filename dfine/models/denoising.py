"""Contrastive denoising queries (DN-DETR / DINO style) built from the ground truth of a training batch.

Each group holds every ground-truth box twice: a *positive* copy jittered by less than half its size (the
decoder must reconstruct the box) and a *negative* copy jittered by half to one size (it must be rejected).
Some labels are flipped to random classes. Groups are hidden from each other and from the matching queries by
the returned attention mask.

The random draws come from the global torch RNG, in the same order, shapes, dtypes and ops as the original
D-FINE implementation, so a seeded run reproduces its noisy queries exactly:
``rand [B, K]`` (label flips), ``randint [B, K] int32`` (new labels), ``randint [B, K, 4]`` (box noise
signs), ``rand [B, K, 4]`` (box noise magnitudes), K = 2 * G * max boxes per image; the label draws are
skipped when ``label_noise_ratio <= 0`` and the box draws when ``box_noise_scale <= 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfine.ops.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["DenoisingQueries", "build_denoising_queries", "denoising_attention_mask", "inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of values in 0..1, clamped so 0 and 1 give finite results.

    Args:
        x: any shape; values are clipped to 0..1 first.
        eps: smallest numerator and denominator.

    Returns:
        ``log(x / (1 - x))``, same shape and dtype.
    """
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DenoisingQueries(NamedTuple):
    """What the decoder prepends to its matching queries in a training step.

    Three cases:

    - denoising switched off (``num_denoising <= 0``): every field is None; the decoder runs as in eval and
      the training output has no ``dn_*`` keys.
    - no image of the batch has a box: ``content``, ``boxes_unact`` and ``attn_mask`` are None (no query
      is added) but ``dn_meta`` is still given, with ``dn_num_group = 0``,
      ``dn_num_split = [0, num_queries]`` and ``dn_positive_idx = None`` (as in the original). The decoder
      then returns empty ``dn_*`` outputs (zero queries), so the output dict has the same keys on every rank
      of a distributed batch.
    - otherwise all four are set.

    Attributes:
        content: [B, K, hidden_dim] class embeddings of the (partly flipped) labels.
        boxes_unact: [B, K, 4] inverse-sigmoid of the noisy boxes, cxcywh.
        attn_mask: [K + Q, K + Q] bool, True where attention is blocked.
        dn_meta: ``dn_positive_idx`` (tuple with one int64 tensor per image: the positive queries' indices
            among the K, ordered group by group), ``dn_num_group`` (G) and ``dn_num_split`` ([K, Q]).
    """

    content: Tensor | None
    boxes_unact: Tensor | None
    attn_mask: Tensor | None
    dn_meta: dict[str, Any] | None


def denoising_attention_mask(
    num_denoising: int, group_size: int, num_queries: int, device: torch.device
) -> Tensor:
    """Attention mask that keeps denoising groups apart and hides them from the matching queries.

    Args:
        num_denoising: K denoising queries (a multiple of ``group_size``), placed first.
        group_size: queries per group (2 * max boxes per image).
        num_queries: Q matching queries, placed after the denoising ones.
        device: where to create the mask.

    Returns:
        [K + Q, K + Q] bool, True = the row query may not attend to the column query.
    """
    size = num_denoising + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    group = torch.arange(num_denoising, device=device) // group_size
    mask[:num_denoising, :num_denoising] = group[:, None] != group[None, :]
    mask[num_denoising:, :num_denoising] = True  # matching queries must not see the answers
    return mask


def _padded_ground_truth(targets: Sequence[dict[str, Tensor]], num_classes: int, max_boxes: int):
    """Labels [B, N] int32 (``num_classes`` = padding), boxes [B, N, 4] cxcywh and a validity mask [B, N]."""
    batch_size, device = len(targets), targets[0]["labels"].device
    labels = torch.full((batch_size, max_boxes), num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros(batch_size, max_boxes, 4, device=device)
    valid = torch.zeros(batch_size, max_boxes, dtype=torch.bool, device=device)
    for image, target in enumerate(targets):
        count = len(target["labels"])
        labels[image, :count] = target["labels"]
        boxes[image, :count] = target["boxes"]
        valid[image, :count] = True
    return labels, boxes, valid


def _jitter_boxes(boxes: Tensor, negative: Tensor, box_noise_scale: float) -> Tensor:
    """Move each edge by up to half the box size (positives) or by a half to one size (negatives).

    Args:
        boxes: [B, K, 4] cxcywh in 0..1.
        negative: [B, K, 1] 1.0 for negative copies, 0.0 for positive ones.
        box_noise_scale: multiplies the noise.

    Returns:
        [B, K, 4] cxcywh in 0..1 (edges clipped to the image; widths and heights made non-negative).
    """
    corners = box_cxcywh_to_xyxy(boxes)
    half_size = (boxes[..., 2:] * 0.5).tile(1, 1, 2) * box_noise_scale  # [B, K, 4] (w/2, h/2, w/2, h/2)
    sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
    magnitude = torch.rand_like(boxes)
    magnitude = (magnitude + 1.0) * negative + magnitude * (1 - negative)
    corners = (corners + sign * magnitude * half_size).clip(min=0.0, max=1.0)
    return box_xyxy_to_cxcywh(corners).abs()


def build_denoising_queries(
    targets: Sequence[dict[str, Tensor]] | None,
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingQueries:
    """Build noisy copies of the ground truth for one training batch.

    Args:
        targets: per image ``labels`` int64 [N] in 0..C-1 and ``boxes`` [N, 4] cxcywh in 0..1.
        num_classes: C; ``class_embed`` row C is the padding label.
        num_queries: Q matching queries that follow the denoising queries.
        class_embed: [C + 1, hidden_dim] embedding of labels.
        num_denoising: budget of denoising queries; G = max(1, num_denoising // max boxes per image) groups.
        label_noise_ratio: twice the probability of flipping a label.
        box_noise_scale: edge noise in units of half the box size (0 = no box noise).

    Returns:
        :class:`DenoisingQueries` (see there for the no-box and switched-off cases).

    Raises:
        ValueError: denoising is on but ``targets`` is None or empty.
    """
    if num_denoising <= 0:
        return DenoisingQueries(None, None, None, None)
    if not targets:
        raise ValueError("training with num_denoising > 0 needs the targets: call model(images, targets)")
    counts = [len(target["labels"]) for target in targets]
    max_boxes = max(counts)
    if max_boxes == 0:
        meta = {"dn_positive_idx": None, "dn_num_group": 0, "dn_num_split": [0, num_queries]}
        return DenoisingQueries(None, None, None, meta)

    num_groups = max(num_denoising // max_boxes, 1)
    labels, boxes, valid = _padded_ground_truth(targets, num_classes, max_boxes)
    # Per group: max_boxes positive slots, then max_boxes negative slots.
    labels = labels.tile(1, 2 * num_groups)  # [B, K]
    boxes = boxes.tile(1, 2 * num_groups, 1)  # [B, K, 4]
    valid = valid.tile(1, 2 * num_groups)  # [B, K]
    negative = torch.zeros(1, 2 * max_boxes, 1, device=boxes.device)
    negative[:, max_boxes:] = 1.0
    negative = negative.tile(1, num_groups, 1)  # [1, K, 1]
    positive = (1 - negative).squeeze(-1) * valid  # [B, K]
    positive_index = torch.nonzero(positive)[:, 1].split([count * num_groups for count in counts])
    total = 2 * max_boxes * num_groups

    if label_noise_ratio > 0:
        flip = torch.rand_like(labels, dtype=torch.float) < (label_noise_ratio * 0.5)
        new_labels = torch.randint_like(flip, 0, num_classes, dtype=labels.dtype)
        labels = torch.where(flip & valid, new_labels, labels)
    if box_noise_scale > 0:
        boxes = _jitter_boxes(boxes, negative, box_noise_scale)

    meta = {
        "dn_positive_idx": positive_index,
        "dn_num_group": num_groups,
        "dn_num_split": [total, num_queries],
    }
    return DenoisingQueries(
        content=class_embed(labels),
        boxes_unact=inverse_sigmoid(boxes),
        attn_mask=denoising_attention_mask(total, 2 * max_boxes, num_queries, boxes.device),
        dn_meta=meta,
    )
