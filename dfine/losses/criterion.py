"""D-FINE's training objective: matching, then VFL / L1 / GIoU / FGL / DDF on every output group.

Output groups and the loss names they produce (``weight_dict`` keys plus a suffix):

==================  ==================  =========================  ====================================
group               suffix              class terms matched by     box and localization terms matched by
==================  ==================  =========================  ====================================
final layer         (none)              its own Hungarian match    union of all matches (GO-LSD)
decoder layer i     ``_aux_i``          its own match              union
pre-decoder head    ``_pre``            its own match              union
encoder proposals   ``_enc_i``          its own match              union
denoising layer i   ``_dn_i``           noised-copy pairs          noised-copy pairs
denoising pre head  ``_dn_pre``         noised-copy pairs          noised-copy pairs
==================  ==================  =========================  ====================================

Class terms are normalised by the number of targets, union-matched terms by the size of the union, both
averaged over ranks. Values equal the original implementation's (``dfine_criterion.py``) to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops.fdr import box_to_distance
from ..registry import LOSSES, ConfigError, did_you_mean
from .loss_terms import (
    box_losses,
    cxcywh_to_xyxy_nonnegative,
    decoupled_distillation_loss,
    fine_grained_localization_loss,
    paired_iou_and_giou,
    sigmoid_focal_loss,
    varifocal_loss,
)
from .pairs import Matching, Pairs, denoising_matches, to_device, union_of_matches

__all__ = ["DFINECriterion"]

logger = logging.getLogger(__name__)

# loss name in `losses` -> the weight_dict keys it produces
_LOSS_KEYS = {
    "vfl": ("loss_vfl",),
    "focal": ("loss_focal",),
    "boxes": ("loss_bbox", "loss_giou"),
    "local": ("loss_fgl", "loss_ddf"),
}
_DISTILLATION_TEMPERATURE = 5.0
# DDF weights its positive/negative halves by sqrt(count * 8 / batch size), as if every rank held 8 images
_DDF_REFERENCE_BATCH = 8


@dataclass
class _Step:
    """Values of one criterion call, shared by the output groups (never stored on the module)."""

    labels: Tensor  # [N] int64, all targets of the batch
    target_boxes: Tensor  # [N, 4] cxcywh, float32
    target_xyxy: Tensor  # [N, 4] xyxy, float32
    matching: Matching
    num_boxes: float  # targets per rank, >= 1
    num_union: float  # union pairs per rank, >= 1
    up: Tensor | None
    reg_scale: Tensor | None
    ddf_weights: tuple[float, float]  # (positive, negative) halves of DDF
    decoder_fgl: tuple[Tensor, Tensor, Tensor] | None = None  # FGL targets of the union pairs
    teachers: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor]] = field(default_factory=dict)


@LOSSES.register()
class DFINECriterion(nn.Module):
    """The D-FINE loss (GO-LSD): Hungarian matching, then weighted loss terms for every output group.

    Args:
        matcher: a built :class:`~dfine.losses.HungarianMatcher` (``dfine.build_criterion`` builds the config's
            ``matcher`` block first and passes it here).
        weight_dict: weight of each term, e.g. ``{loss_vfl: 1, loss_bbox: 5, loss_giou: 2, loss_fgl: 0.15,
            loss_ddf: 1.5}``; terms without a weight are not returned.
        losses: which losses to compute: ``vfl`` or ``focal`` (classification), ``boxes`` (L1 + GIoU),
            ``local`` (FGL + DDF).
        alpha, gamma: focal parameters of the class loss (D-FINE: 0.75, 2.0).
        num_classes: number of classes C (passed by the builder).
        reg_max: number of bin intervals per edge (R - 1), as in the decoder.
        boxes_weight_format: None, ``iou`` or ``giou``: weight the GIoU term by, and use as the class target, the
            IoU (or GIoU) of each match.
        share_matched_indices: accepted for config compatibility; the original stores it and never reads it.

    Called as ``criterion(outputs, targets, **meta)`` with the training-mode model output (see
    :meth:`forward`); returns ``{name: weighted scalar loss}``, float32, to be summed by the trainer.
    """

    def __init__(
        self,
        matcher: nn.Module,
        weight_dict: Mapping[str, float],
        losses: Sequence[str],
        alpha: float = 0.2,
        gamma: float = 2.0,
        num_classes: int = 80,
        reg_max: int = 32,
        boxes_weight_format: str | None = None,
        share_matched_indices: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(matcher, Mapping) or not hasattr(matcher, "match_many"):
            raise TypeError(
                f"matcher must be a built HungarianMatcher, got {type(matcher).__name__}; build the "
                "{type: HungarianMatcher, ...} block first (dfine.build_criterion does)."
            )
        _check_losses(losses, weight_dict)
        if boxes_weight_format not in (None, "iou", "giou"):
            raise ConfigError(
                f"boxes_weight_format must be null, 'iou' or 'giou', got {boxes_weight_format!r}."
            )
        self.matcher = matcher
        self.weight_dict = {key: float(value) for key, value in weight_dict.items()}
        self.losses = tuple(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.boxes_weight_format = boxes_weight_format
        self.share_matched_indices = share_matched_indices

    def extra_repr(self) -> str:
        return f"losses={list(self.losses)}, weight_dict={self.weight_dict}, num_classes={self.num_classes}"

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]], **meta: Any
    ) -> dict[str, Tensor]:
        """Compute every weighted loss term.

        Args:
            outputs: the model's training output: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] cxcywh,
                ``pred_corners`` [B, Q, 4 * R], ``ref_points`` [B, Q, 4], ``up``, ``reg_scale``; ``aux_outputs``
                (dicts with also ``teacher_corners``, ``teacher_logits``), ``pre_outputs``, ``enc_aux_outputs``,
                ``enc_meta``; with denoising ``dn_outputs``, ``dn_pre_outputs`` and ``dn_meta``.
            targets: B dicts with ``labels`` [N] int64 and ``boxes`` [N, 4] cxcywh in 0..1.
            **meta: epoch, step, ...: accepted and unused.

        Returns:
            ``{loss_vfl, loss_bbox, ..., loss_vfl_aux_0, ..., loss_ddf_dn_1, ...}``: weighted float32 scalars.
            Every call with the same model settings returns the same keys: when ``dn_meta`` is present but the
            batch gave no denoising queries (no boxes on this rank), the denoising terms are zeros built from the
            regular outputs (``0 * pred.sum()``), so every rank's graph reaches the same parameters under DDP.
        """
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(
                f"pred_logits has {outputs['pred_logits'].shape[-1]} classes but the criterion was built with "
                f"num_classes={self.num_classes}; the model and criterion must share the config's num_classes."
            )
        device = outputs["pred_logits"].device
        with torch.autocast(device.type, enabled=False):
            step = self._prepare(outputs, targets)
            losses = self._main_losses(outputs, step)
            losses.update(self._aux_losses(outputs, step))
            losses.update(self._pre_losses(outputs, step))
            losses.update(self._enc_losses(outputs, step))
            losses.update(self._dn_losses(outputs, step))
        return losses

    # ----------------------------------------------------------------------------------------------- matching
    def match(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> Matching:
        """Hungarian matches of the final layer, auxiliary layers, pre-decoder head and encoder, their union,
        and the denoising pairs (if the output has usable ones)."""
        named = [("main", outputs)]
        named += [(f"aux_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", ()))]
        if "pre_outputs" in outputs:
            named.append(("pre", outputs["pre_outputs"]))
        encoder = [(f"enc_{i}", enc) for i, enc in enumerate(outputs.get("enc_aux_outputs", ()))]
        if _class_agnostic(outputs):
            found = self.matcher.match_many([o for _, o in named], targets)
            found += self.matcher.match_many([o for _, o in encoder], _agnostic_targets(targets))
        else:
            found = self.matcher.match_many([o for _, o in named + encoder], targets)
        own = {name: matches for (name, _), matches in zip(named + encoder, found, strict=True)}
        sizes = [int(t["labels"].shape[0]) for t in targets]
        dn = denoising_matches(outputs["dn_meta"], sizes) if _has_denoising(outputs) else None
        return to_device(own, union_of_matches(found), dn, sizes, outputs["pred_logits"].device)

    def _prepare(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> _Step:
        device = outputs["pred_logits"].device
        matching = self.match(outputs, targets)
        num_targets = sum(int(t["labels"].shape[0]) for t in targets)
        num_boxes, num_union = (
            max(v, 1.0) for v in _average_over_ranks([num_targets, len(matching.union)], device)
        )
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float().reshape(-1, 4)
        batch_size, num_queries = outputs["pred_boxes"].shape[:2]
        # DDF weights use this rank's union size, as the original does (not averaged over ranks)
        positive, total = 4 * len(matching.union), 4 * batch_size * num_queries
        scale = _DDF_REFERENCE_BATCH / batch_size
        step = _Step(
            labels=torch.cat([t["labels"] for t in targets]).to(device).long(),
            target_boxes=target_boxes,
            target_xyxy=cxcywh_to_xyxy_nonnegative(target_boxes),
            matching=matching,
            num_boxes=num_boxes,
            num_union=num_union,
            up=outputs.get("up"),
            reg_scale=outputs.get("reg_scale"),
            ddf_weights=((positive * scale) ** 0.5, ((total - positive) * scale) ** 0.5),
        )
        # every decoder layer decodes from the same reference points, so the main output's FGL targets serve all
        step.decoder_fgl = self._fgl_targets(outputs, matching.union, step)
        return step

    # ------------------------------------------------------------------------------------------ output groups
    def _main_losses(self, outputs: Mapping[str, Any], step: _Step) -> dict[str, Tensor]:
        pairs = step.matching
        return self._output_losses(
            outputs,
            step,
            pairs.own["main"],
            pairs.union,
            step.num_boxes,
            step.num_union,
            step.decoder_fgl,
            "",
        )

    def _aux_losses(self, outputs: Mapping[str, Any], step: _Step) -> dict[str, Tensor]:
        pairs, losses, fgl = step.matching, {}, step.decoder_fgl
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            own = pairs.own[f"aux_{i}"]
            losses.update(
                self._output_losses(
                    aux, step, own, pairs.union, step.num_boxes, step.num_union, fgl, f"_aux_{i}"
                )
            )
        return losses

    def _pre_losses(self, outputs: Mapping[str, Any], step: _Step) -> dict[str, Tensor]:
        if "pre_outputs" not in outputs:
            return {}
        pairs = step.matching
        return self._output_losses(
            outputs["pre_outputs"],
            step,
            pairs.own["pre"],
            pairs.union,
            step.num_boxes,
            step.num_union,
            None,
            "_pre",
        )

    def _enc_losses(self, outputs: Mapping[str, Any], step: _Step) -> dict[str, Tensor]:
        pairs, losses = step.matching, {}
        labels = torch.zeros_like(step.labels) if _class_agnostic(outputs) else None
        for i, enc in enumerate(outputs.get("enc_aux_outputs", ())):
            own = pairs.own[f"enc_{i}"]
            losses.update(
                self._output_losses(
                    enc, step, own, pairs.union, step.num_boxes, step.num_union, None, f"_enc_{i}", labels
                )
            )
        return losses

    def _dn_losses(self, outputs: Mapping[str, Any], step: _Step) -> dict[str, Tensor]:
        if "dn_outputs" in outputs and "dn_meta" not in outputs:
            raise KeyError(
                "outputs has 'dn_outputs' but no 'dn_meta'; the criterion needs both to pair them."
            )
        if "dn_meta" not in outputs:
            return {}
        pairs = step.matching.denoising
        if pairs is None:
            return self._zero_dn_losses(outputs)
        # the original normalises by the target count (rank-averaged) times the number of groups
        num_boxes = step.num_boxes * int(outputs["dn_meta"]["dn_num_group"])
        layers = outputs["dn_outputs"]
        fgl = self._fgl_targets(layers[0], pairs, step) if layers else None
        losses = {}
        for i, layer in enumerate(layers):
            losses.update(
                self._output_losses(layer, step, pairs, pairs, num_boxes, num_boxes, fgl, f"_dn_{i}")
            )
        if "dn_pre_outputs" in outputs:
            pre = outputs["dn_pre_outputs"]
            losses.update(self._output_losses(pre, step, pairs, pairs, num_boxes, num_boxes, None, "_dn_pre"))
        return losses

    def _zero_dn_losses(self, outputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """The denoising keys as zeros on the regular outputs: a batch without boxes gives no denoising queries,
        but under DDP every rank must return the same terms from a graph over the same parameters."""
        layers = [*outputs.get("aux_outputs", ()), outputs]
        sources = [(f"_dn_{i}", layer, True) for i, layer in enumerate(layers)]
        if "pre_outputs" in outputs:
            sources.append(("_dn_pre", outputs["pre_outputs"], False))
        losses = {}
        for suffix, layer, is_layer in sources:
            for name in self.losses:
                if name == "local" and not (is_layer and "pred_corners" in layer):
                    continue
                tensor = {"local": "pred_corners", "boxes": "pred_boxes"}.get(name, "pred_logits")
                zero = layer[tensor].float().sum() * 0.0
                losses.update({key + suffix: zero for key in _LOSS_KEYS[name] if key in self.weight_dict})
        return losses

    # ------------------------------------------------------------------------------------------- one output
    def _output_losses(
        self,
        output: Mapping[str, Tensor],
        step: _Step,
        class_pairs: Pairs,
        box_pairs: Pairs,
        class_norm: float,
        box_norm: float,
        fgl_targets: tuple[Tensor, Tensor, Tensor] | None,
        suffix: str,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Weighted terms of one output dict, keys suffixed with ``suffix``."""
        pred_boxes = output["pred_boxes"].float()
        matched_boxes = pred_boxes[box_pairs.batch_index, box_pairs.query_index]  # [K, 4] cxcywh
        iou, giou = paired_iou_and_giou(
            cxcywh_to_xyxy_nonnegative(matched_boxes), step.target_xyxy[box_pairs.target_index]
        )
        terms: dict[str, Tensor] = {}
        for name in self.losses:
            if name in ("vfl", "focal"):
                all_labels = step.labels if labels is None else labels
                terms.update(
                    self._class_loss(
                        name, output, step, class_pairs, all_labels, class_norm, box_pairs, iou, giou
                    )
                )
            elif name == "boxes":
                weight = None
                if self.boxes_weight_format is not None:
                    weight = (iou if self.boxes_weight_format == "iou" else giou).detach()
                targets = step.target_boxes[box_pairs.target_index]
                terms["loss_bbox"], terms["loss_giou"] = box_losses(
                    matched_boxes, targets, giou, box_norm, weight
                )
            elif name == "local" and "pred_corners" in output:
                if fgl_targets is None:
                    raise KeyError(
                        f"output group '{suffix or 'main'}' has pred_corners but no ref_points source."
                    )
                terms.update(self._local_losses(output, step, box_pairs, iou.detach(), box_norm, fgl_targets))
        return {
            key + suffix: value * self.weight_dict[key]
            for key, value in terms.items()
            if key in self.weight_dict
        }

    def _class_loss(
        self,
        name: str,
        output: Mapping[str, Tensor],
        step: _Step,
        pairs: Pairs,
        labels: Tensor,
        num_boxes: float,
        box_pairs: Pairs,
        box_iou: Tensor,
        box_giou: Tensor,
    ) -> dict[str, Tensor]:
        matched_labels = labels[pairs.target_index]
        if name == "focal":
            loss = sigmoid_focal_loss(
                output["pred_logits"],
                pairs.batch_index,
                pairs.query_index,
                matched_labels,
                num_boxes,
                self.alpha,
                self.gamma,
            )
            return {"loss_focal": loss}
        if pairs is box_pairs:
            iou, giou = box_iou, box_giou
        else:
            with torch.no_grad():
                matched = output["pred_boxes"].float()[pairs.batch_index, pairs.query_index]
                iou, giou = paired_iou_and_giou(
                    cxcywh_to_xyxy_nonnegative(matched), step.target_xyxy[pairs.target_index]
                )
        scores = (giou if self.boxes_weight_format == "giou" else iou).detach()
        loss = varifocal_loss(
            output["pred_logits"],
            pairs.batch_index,
            pairs.query_index,
            matched_labels,
            scores,
            num_boxes,
            self.alpha,
            self.gamma,
        )
        return {"loss_vfl": loss}

    def _local_losses(
        self,
        output: Mapping[str, Tensor],
        step: _Step,
        pairs: Pairs,
        iou: Tensor,
        num_boxes: float,
        fgl_targets: tuple[Tensor, Tensor, Tensor],
    ) -> dict[str, Tensor]:
        corners = output["pred_corners"].float()
        matched = corners[pairs.batch_index, pairs.query_index]  # [K, 4 * R]
        terms = {"loss_fgl": fine_grained_localization_loss(matched, *fgl_targets, iou, num_boxes)}
        if "teacher_corners" not in output:
            return terms
        if _same_tensor(output["pred_corners"], output["teacher_corners"]):
            # the final layer is its own teacher: nothing to distil
            terms["loss_ddf"] = corners.sum() * 0.0
            return terms
        teacher_probs, teacher_score = self._teacher(output, step)
        positive_weight, negative_weight = step.ddf_weights
        terms["loss_ddf"] = decoupled_distillation_loss(
            corners,
            teacher_probs,
            teacher_score,
            pairs.batch_index,
            pairs.query_index,
            iou,
            positive_weight,
            negative_weight,
            _DISTILLATION_TEMPERATURE,
        )
        return terms

    # ---------------------------------------------------------------------------------------------- helpers
    def _fgl_targets(
        self, output: Mapping[str, Tensor], pairs: Pairs, step: _Step
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Target bin positions and interpolation weights of the matched targets' edges (FGL)."""
        if "local" not in self.losses or "pred_corners" not in output:
            return None
        if "ref_points" not in output or step.up is None or step.reg_scale is None:
            raise KeyError("the 'local' loss needs ref_points, up and reg_scale in the model outputs.")
        with torch.no_grad():
            ref = output["ref_points"].float()[pairs.batch_index, pairs.query_index]
            boxes = step.target_xyxy[pairs.target_index]
            return box_to_distance(ref, boxes, self.reg_max, step.up.float(), step.reg_scale)

    def _teacher(self, output: Mapping[str, Tensor], step: _Step) -> tuple[Tensor, Tensor]:
        """The final layer's softened distributions [B*Q*4, R] and top class probability [B, Q], computed once
        per teacher tensor and shared by every layer it teaches."""
        corners = output["teacher_corners"]
        key = (corners.data_ptr(), tuple(corners.shape))
        if key not in step.teachers:
            with torch.no_grad():
                num_bins = self.reg_max + 1
                probs = (corners.float().reshape(-1, num_bins) / _DISTILLATION_TEMPERATURE).softmax(dim=1)
                score = output["teacher_logits"].float().sigmoid().max(dim=-1).values
            step.teachers[key] = (probs, score)
        return step.teachers[key]


def _check_losses(losses: Sequence[str], weight_dict: Mapping[str, float]) -> None:
    if not isinstance(weight_dict, Mapping):
        raise ConfigError(
            f"weight_dict must be a mapping like {{loss_vfl: 1, loss_bbox: 5}}, got {weight_dict!r}."
        )
    if isinstance(losses, str) or not isinstance(losses, Sequence):
        raise ConfigError(f"losses must be a list like [vfl, boxes, local], got {losses!r}.")
    for name in losses:
        if name not in _LOSS_KEYS:
            raise ConfigError(
                f"unknown loss '{name}'.{did_you_mean(str(name), _LOSS_KEYS)} Valid: {', '.join(_LOSS_KEYS)}."
            )
    known = {key for keys in _LOSS_KEYS.values() for key in keys}
    for key in weight_dict:
        if key not in known:
            raise ConfigError(
                f"weight_dict key '{key}' is not a loss term.{did_you_mean(key, known)} Valid: {', '.join(sorted(known))}."
            )
    for name in losses:
        if not any(key in weight_dict for key in _LOSS_KEYS[name]):
            raise ConfigError(
                f"loss '{name}' is requested but none of its terms {list(_LOSS_KEYS[name])} has a weight in "
                "weight_dict, so it would never be returned; add a weight or drop it from losses."
            )


def _class_agnostic(outputs: Mapping[str, Any]) -> bool:
    return bool(outputs.get("enc_meta", {}).get("class_agnostic", False))


def _agnostic_targets(targets: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    return [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]


def _has_denoising(outputs: Mapping[str, Any]) -> bool:
    meta = outputs.get("dn_meta")
    return (
        meta is not None
        and "dn_outputs" in outputs
        and meta.get("dn_positive_idx") is not None
        and int(meta.get("dn_num_group", 0)) > 0
    )


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Same memory, shape and strides (the model passes the final layer's corners as its own teacher)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _average_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` averaged over the ranks of the default process group (unchanged without one): one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()
