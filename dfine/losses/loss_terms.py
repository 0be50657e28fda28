"""The D-FINE loss formulas, one function per term, on already-matched (prediction, target) pairs.

Matched pairs are given as flat index tensors over the batch: ``batch_index``, ``query_index`` ([K] int64)
pick predictions, and the matching targets' values are passed in already gathered. Every function computes in
float32 (inputs are upcast) and returns an *unweighted* scalar; the criterion applies ``weight_dict``.

The formulas follow D-FINE (Peng et al., 2024): varifocal loss with IoU targets (or DEIM's matchability-aware
loss), L1 + GIoU on boxes, the Fine-Grained Localization loss on the per-edge bin distributions and the
Decoupled Distillation Focal loss that distils the last decoder layer into the earlier ones (GO-LSD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

__all__ = [
    "box_losses",
    "decoupled_distillation_loss",
    "fine_grained_localization_loss",
    "matchability_aware_loss",
    "sigmoid_focal_loss",
    "varifocal_loss",
]


def _one_hot_targets(logits: Tensor, batch_index: Tensor, query_index: Tensor, labels: Tensor) -> Tensor:
    target = torch.zeros_like(logits)  # [B, Q, C]
    target[batch_index, query_index, labels] = 1.0
    return target


def varifocal_loss(
    logits: Tensor,
    batch_index: Tensor,
    query_index: Tensor,
    labels: Tensor,
    scores: Tensor,
    num_boxes: float,
    alpha: float,
    gamma: float,
) -> Tensor:
    """Varifocal loss: BCE towards the IoU of matched queries, focal down-weighting of the negatives.

    Args:
        logits: [B, Q, C] class logits.
        batch_index, query_index: [K] the matched predictions (each query at most once).
        labels: [K] int64 class of each matched target.
        scores: [K] soft target of each match (its IoU with the target), detached.
        num_boxes: normaliser (number of target boxes, averaged over ranks, >= 1).
        alpha, gamma: focal weight of the negatives, ``alpha * sigmoid(logit) ** gamma``.

    Returns:
        Scalar loss.
    """
    logits = logits.float()
    target = _one_hot_targets(logits, batch_index, query_index, labels)
    target_score = torch.zeros_like(logits)
    target_score[batch_index, query_index, labels] = scores.to(logits.dtype)
    weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - target) + target_score
    loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
    # mean over queries times Q keeps the original's summation order (and so its rounding)
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def matchability_aware_loss(
    logits: Tensor,
    batch_index: Tensor,
    query_index: Tensor,
    labels: Tensor,
    scores: Tensor,
    num_boxes: float,
    gamma: float,
    alpha: float | None = None,
) -> Tensor:
    """Matchability-Aware Loss (DEIM, Huang et al., 2025): VFL with the IoU target raised to ``gamma``.

    Positives are pulled towards ``iou ** gamma`` with weight 1 (VFL weighs them by the IoU itself, which
    starves the low-IoU matches Dense O2O creates); negatives keep the focal weight
    ``sigmoid(logit) ** gamma``, times ``alpha`` when given.

    Args:
        logits: [B, Q, C] class logits.
        batch_index, query_index: [K] the matched predictions (each query at most once).
        labels: [K] int64 class of each matched target.
        scores: [K] IoU of each match with its target, detached.
        num_boxes: normaliser (number of target boxes, averaged over ranks, >= 1).
        gamma: exponent of the target and of the negatives' weight (DEIM: 1.5).
        alpha: optional factor on the negatives' weight (DEIM's ``mal_alpha``; None: 1).

    Returns:
        Scalar loss.
    """
    logits = logits.float()
    target = _one_hot_targets(logits, batch_index, query_index, labels)
    target_score = torch.zeros_like(logits)
    target_score[batch_index, query_index, labels] = scores.to(logits.dtype).pow(gamma)
    negative_weight = logits.detach().sigmoid().pow(gamma) * (1 - target)
    if alpha is not None:
        negative_weight = alpha * negative_weight
    weight = negative_weight + target
    loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def sigmoid_focal_loss(
    logits: Tensor,
    batch_index: Tensor,
    query_index: Tensor,
    labels: Tensor,
    num_boxes: float,
    alpha: float,
    gamma: float,
) -> Tensor:
    """Sigmoid focal loss (RetinaNet) on one-hot class targets; arguments as :func:`varifocal_loss`."""
    logits = logits.float()
    target = _one_hot_targets(logits, batch_index, query_index, labels)
    loss = torchvision.ops.sigmoid_focal_loss(logits, target, alpha, gamma, reduction="none")
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def box_losses(
    pred_boxes: Tensor,
    target_boxes: Tensor,
    giou: Tensor,
    num_boxes: float,
    giou_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """L1 and GIoU losses of matched boxes.

    Args:
        pred_boxes: [K, 4] matched predictions, cxcywh in 0..1.
        target_boxes: [K, 4] their targets, cxcywh in 0..1.
        giou: [K] GIoU of each pair (with gradient), from :func:`dfine.ops.box_ops.paired_iou_and_giou`.
        num_boxes: normaliser, >= 1.
        giou_weight: optional [K] per-pair weight of the GIoU term (``boxes_weight_format``).

    Returns:
        ``(loss_bbox, loss_giou)`` scalars.
    """
    loss_l1 = F.l1_loss(pred_boxes.float(), target_boxes.float(), reduction="none").sum() / num_boxes
    loss_giou = 1 - giou
    if giou_weight is not None:
        loss_giou = loss_giou * giou_weight
    return loss_l1, loss_giou.sum() / num_boxes


def fine_grained_localization_loss(
    corners: Tensor,
    bin_position: Tensor,
    weight_right: Tensor,
    weight_left: Tensor,
    iou: Tensor,
    num_boxes: float,
) -> Tensor:
    """FGL: cross-entropy of each edge distribution towards its two target bins, weighted by the match's IoU.

    Args:
        corners: [K, 4 * R] matched bin logits (edges left, top, right, bottom).
        bin_position: [K * 4] target position in bins (0..reg_max - 0.1), from ``box_to_distance``.
        weight_right, weight_left: [K * 4] interpolation weights of the bins right and left of the target.
        iou: [K] IoU of each matched prediction with its target, detached.
        num_boxes: normaliser (number of matched pairs, averaged over ranks, >= 1).

    Returns:
        Scalar loss.
    """
    num_bins = corners.shape[-1] // 4
    log_probs = F.log_softmax(corners.float().reshape(-1, num_bins), dim=1)  # [K * 4, R]
    left = bin_position.long()[:, None]
    loss_left = -log_probs.gather(1, left).squeeze(1)
    loss_right = -log_probs.gather(1, left + 1).squeeze(1)
    loss = loss_left * weight_left + loss_right * weight_right
    loss = loss * iou.repeat_interleave(4).float()
    return loss.sum() / num_boxes


def decoupled_distillation_loss(
    corners: Tensor,
    teacher_probs: Tensor,
    teacher_score: Tensor,
    batch_index: Tensor,
    query_index: Tensor,
    iou: Tensor,
    positive_weight: float,
    negative_weight: float,
    temperature: float = 5.0,
) -> Tensor:
    """DDF: KL divergence of every query's edge distributions to the final layer's, in two weighted halves.

    Each query is weighted by the teacher's confidence (its top class probability), matched queries by their
    IoU instead. The mean over matched ("positive") edges and the mean over the rest are combined with
    ``positive_weight`` and ``negative_weight`` (D-FINE uses the square roots of the two counts).

    Args:
        corners: [B, Q, 4 * R] this layer's bin logits.
        teacher_probs: [B * Q * 4, R] the final layer's distributions ``softmax(corners / T)``, detached.
        teacher_score: [B, Q] the final layer's top class probability, detached.
        batch_index, query_index: [K] matched queries (no duplicates).
        iou: [K] IoU of each matched prediction with its target, detached.
        positive_weight, negative_weight: weights of the two means (> 0 together).
        temperature: distillation temperature T (5 in D-FINE).

    Returns:
        Scalar loss.
    """
    batch_size, num_queries = corners.shape[:2]
    num_bins = teacher_probs.shape[-1]
    log_student = F.log_softmax(corners.float().reshape(-1, num_bins) / temperature, dim=1)
    divergence = F.kl_div(log_student, teacher_probs, reduction="none").sum(-1)  # [B * Q * 4]
    weight = teacher_score.clone()
    weight[batch_index, query_index] = iou.to(weight.dtype)
    loss = weight.repeat_interleave(4, dim=-1).reshape(-1) * (temperature**2) * divergence
    positive = torch.zeros(batch_size, num_queries, dtype=loss.dtype, device=loss.device)
    positive[batch_index, query_index] = 1.0
    positive = positive.repeat_interleave(4, dim=-1).reshape(-1)
    # masked sums over known counts instead of boolean indexing: no device->host sync
    num_positive = 4 * batch_index.numel()
    num_negative = loss.numel() - num_positive
    positive_mean = (loss * positive).sum() / max(num_positive, 1)
    negative_mean = (loss * (1 - positive)).sum() / max(num_negative, 1)
    return (positive_mean * positive_weight + negative_mean * negative_weight) / (
        positive_weight + negative_weight
    )
