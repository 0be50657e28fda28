"""All loss terms of one output dict (one decoder layer, the pre-decoder head, an encoder output, ...).

:func:`output_terms` picks the matched predictions, computes the box geometry once and calls the formulas of
:mod:`dfine.losses.loss_terms`; it returns *unweighted* terms. What is matched to what, and how each group is
normalised, is decided by the criterion and passed in as a :class:`Supervision`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfine.losses.loss_terms import (
    box_losses,
    decoupled_distillation_loss,
    fine_grained_localization_loss,
    matchability_aware_loss,
    sigmoid_focal_loss,
    varifocal_loss,
)
from dfine.losses.pairs import Pairs
from dfine.ops.box_ops import box_cxcywh_to_xyxy, paired_iou_and_giou
from dfine.ops.fdr import box_to_distance

__all__ = ["BatchContext", "LossSettings", "Supervision", "fgl_targets", "output_terms"]

DISTILLATION_TEMPERATURE = 5.0

FglTargets = tuple[Tensor, Tensor, Tensor]
"""``(bin_position, weight_right, weight_left)``, each [K * 4], from ``box_to_distance``."""


@dataclass(frozen=True)
class LossSettings:
    """The criterion's configuration that the formulas need."""

    losses: tuple[str, ...]
    alpha: float
    gamma: float
    reg_max: int
    boxes_weight_format: str | None
    mal_alpha: float | None = None


@dataclass
class BatchContext:
    """Values of one criterion call shared by every output (built per call, never kept on the module).

    Attributes:
        labels: [N] int64 classes of all the batch's targets (image 0's first).
        target_boxes: [N, 4] cxcywh float32; ``target_xyxy`` the same as xyxy.
        up, reg_scale: the decoder's weighting-function parameters (from the outputs).
        ddf_weights: (positive, negative) weights of DDF's two halves.
        teachers: cache of each teacher tensor's softened distributions and scores.
    """

    labels: Tensor
    target_boxes: Tensor
    target_xyxy: Tensor
    up: Tensor | None
    reg_scale: Tensor | None
    ddf_weights: tuple[float, float]
    teachers: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Supervision:
    """How one output is supervised.

    Attributes:
        class_pairs: pairs for the class term (an output's own match, or the denoising pairs).
        box_pairs: pairs for the box and localization terms (the GO-LSD union, or the denoising pairs).
        class_norm, box_norm: their normalisers (>= 1).
        fgl: FGL targets of ``box_pairs`` (None: the output has no localization terms).
        labels: [N] class of every target, replacing the real ones (class-agnostic encoder), or None.
    """

    class_pairs: Pairs
    box_pairs: Pairs
    class_norm: float
    box_norm: float
    fgl: FglTargets | None = None
    labels: Tensor | None = None


def fgl_targets(
    output: Mapping[str, Tensor], pairs: Pairs, context: BatchContext, reg_max: int
) -> FglTargets:
    """Target bin positions and interpolation weights of the paired targets' edges, from ``ref_points``."""
    if "ref_points" not in output or context.up is None or context.reg_scale is None:
        raise KeyError("the 'local' loss needs ref_points, up and reg_scale in the model outputs.")
    with torch.no_grad():
        ref = output["ref_points"].float()[pairs.batch_index, pairs.query_index]  # [K, 4] cxcywh
        boxes = context.target_xyxy[pairs.target_index]
        return box_to_distance(ref, boxes, reg_max, context.up.float(), context.reg_scale)


def output_terms(
    output: Mapping[str, Tensor], supervision: Supervision, context: BatchContext, settings: LossSettings
) -> dict[str, Tensor]:
    """Unweighted terms (``loss_vfl``/``loss_mal``/``loss_focal``, ``loss_bbox``, ``loss_giou``, ``loss_fgl``,
    ``loss_ddf``) of one output dict, for the losses in ``settings.losses`` the output supports."""
    box_pairs = supervision.box_pairs
    matched_boxes = output["pred_boxes"].float()[box_pairs.batch_index, box_pairs.query_index]  # [K, 4]
    iou, giou = paired_iou_and_giou(
        box_cxcywh_to_xyxy(matched_boxes), context.target_xyxy[box_pairs.target_index]
    )
    terms: dict[str, Tensor] = {}
    for name in settings.losses:
        if name in ("vfl", "mal", "focal"):
            terms.update(_class_terms(name, output, supervision, context, settings, (iou, giou)))
        elif name == "boxes":
            weight = None
            if settings.boxes_weight_format is not None:
                weight = (iou if settings.boxes_weight_format == "iou" else giou).detach()
            targets = context.target_boxes[box_pairs.target_index]
            terms["loss_bbox"], terms["loss_giou"] = box_losses(
                matched_boxes, targets, giou, supervision.box_norm, weight
            )
        elif name == "local" and "pred_corners" in output:
            terms.update(_local_terms(output, supervision, context, settings, iou.detach()))
    return terms


def _class_terms(
    name: str,
    output: Mapping[str, Tensor],
    supervision: Supervision,
    context: BatchContext,
    settings: LossSettings,
    box_geometry: tuple[Tensor, Tensor],
) -> dict[str, Tensor]:
    pairs = supervision.class_pairs
    labels = (context.labels if supervision.labels is None else supervision.labels)[pairs.target_index]
    logits = output["pred_logits"]
    if name == "focal":
        loss = sigmoid_focal_loss(
            logits, pairs.batch_index, pairs.query_index, labels, supervision.class_norm, *_focal(settings)
        )
        return {"loss_focal": loss}
    if pairs is supervision.box_pairs:
        iou, giou = box_geometry
    else:
        with torch.no_grad():
            matched = output["pred_boxes"].float()[pairs.batch_index, pairs.query_index]
            iou, giou = paired_iou_and_giou(
                box_cxcywh_to_xyxy(matched), context.target_xyxy[pairs.target_index]
            )
    scores = (giou if settings.boxes_weight_format == "giou" else iou).detach()
    if name == "mal":
        args = (pairs.batch_index, pairs.query_index, labels, scores, supervision.class_norm)
        return {"loss_mal": matchability_aware_loss(logits, *args, settings.gamma, settings.mal_alpha)}
    loss = varifocal_loss(
        logits,
        pairs.batch_index,
        pairs.query_index,
        labels,
        scores,
        supervision.class_norm,
        *_focal(settings),
    )
    return {"loss_vfl": loss}


def _focal(settings: LossSettings) -> tuple[float, float]:
    return settings.alpha, settings.gamma


def _local_terms(
    output: Mapping[str, Tensor],
    supervision: Supervision,
    context: BatchContext,
    settings: LossSettings,
    iou: Tensor,
) -> dict[str, Tensor]:
    if supervision.fgl is None:
        raise KeyError("an output with pred_corners was given no FGL targets (ref_points source missing).")
    pairs = supervision.box_pairs
    corners = output["pred_corners"].float()
    matched = corners[pairs.batch_index, pairs.query_index]  # [K, 4 * R]
    terms = {"loss_fgl": fine_grained_localization_loss(matched, *supervision.fgl, iou, supervision.box_norm)}
    if "teacher_corners" not in output:
        return terms
    if _same_tensor(output["pred_corners"], output["teacher_corners"]):
        # the final layer is its own teacher: nothing to distil
        terms["loss_ddf"] = corners.sum() * 0.0
        return terms
    teacher_probs, teacher_score = _teacher(output, context, settings.reg_max + 1)
    positive_weight, negative_weight = context.ddf_weights
    terms["loss_ddf"] = decoupled_distillation_loss(
        corners,
        teacher_probs,
        teacher_score,
        pairs.batch_index,
        pairs.query_index,
        iou,
        positive_weight,
        negative_weight,
        DISTILLATION_TEMPERATURE,
    )
    return terms


def _teacher(output: Mapping[str, Tensor], context: BatchContext, num_bins: int) -> tuple[Tensor, Tensor]:
    """The teacher's softened distributions [B*Q*4, R] and top class probability [B, Q], computed once per
    teacher tensor and shared by every layer it teaches."""
    corners = output["teacher_corners"]
    key = (corners.data_ptr(), tuple(corners.shape))
    if key not in context.teachers:
        with torch.no_grad():
            probs = (corners.float().reshape(-1, num_bins) / DISTILLATION_TEMPERATURE).softmax(dim=1)
            score = output["teacher_logits"].float().sigmoid().max(dim=-1).values
        context.teachers[key] = (probs, score)
    return context.teachers[key]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Same memory, shape and strides: the model hands the final layer's corners over as its own teacher."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())
