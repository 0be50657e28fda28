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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dfine.config.registry import LOSSES, ConfigError, did_you_mean
from dfine.losses.output_terms import (
    BatchContext,
    FglTargets,
    LossSettings,
    Supervision,
    fgl_targets,
    output_terms,
)
from dfine.losses.pairs import Matching, Pairs, denoising_matches, to_device, union_of_matches
from dfine.ops.box_ops import box_cxcywh_to_xyxy

__all__ = ["DEIMCriterion", "DFINECriterion"]

# loss name in `losses` -> the weight_dict keys it produces
_LOSS_KEYS = {
    "vfl": ("loss_vfl",),
    "mal": ("loss_mal",),
    "focal": ("loss_focal",),
    "boxes": ("loss_bbox", "loss_giou"),
    "local": ("loss_fgl", "loss_ddf"),
}
# DDF weights its positive/negative halves by sqrt(count * 8 / batch size), as if every rank held 8 images
_DDF_REFERENCE_BATCH = 8


@LOSSES.register()
class DFINECriterion(nn.Module):
    """The D-FINE loss (GO-LSD): Hungarian matching, then weighted loss terms for every output group.

    Args:
        matcher: a built :class:`~dfine.losses.HungarianMatcher` (``dfine.build_criterion`` builds the
            config's ``matcher`` block first and passes it here).
        weight_dict: weight of each term, e.g. ``{loss_vfl: 1, loss_bbox: 5, loss_giou: 2, loss_fgl: 0.15,
            loss_ddf: 1.5}``; terms without a weight are not returned.
        losses: which losses to compute: ``vfl``, ``mal`` or ``focal`` (classification), ``boxes``
            (L1 + GIoU), ``local`` (FGL + DDF).
        alpha, gamma: focal parameters of the class loss (D-FINE: 0.75, 2.0).
        num_classes: number of classes C (passed by the builder).
        reg_max: number of bin intervals per edge (R - 1), as in the decoder.
        boxes_weight_format: None, ``iou`` or ``giou``: weight the GIoU term by, and use as the class target,
            the IoU (or GIoU) of each match.
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
        # D-FINE always supervises boxes on the union of matches; DEIMCriterion makes it a setting
        self.use_uni_set = True
        self.mal_alpha: float | None = None

    @property
    def _settings(self) -> LossSettings:
        return LossSettings(
            self.losses, self.alpha, self.gamma, self.reg_max, self.boxes_weight_format, self.mal_alpha
        )

    def _box_supervision(
        self, matching: Matching, name: str, norms: tuple[float, float]
    ) -> tuple[Pairs, float, float]:
        """(box pairs, class norm, box norm) of output ``name``: the union (GO-LSD) or its own match."""
        if self.use_uni_set:
            return matching.union, *norms
        return matching.own[name], norms[0], norms[0]

    def extra_repr(self) -> str:
        return f"losses={list(self.losses)}, weight_dict={self.weight_dict}, num_classes={self.num_classes}"

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]], **meta: Any
    ) -> dict[str, Tensor]:
        """Compute every weighted loss term.

        Args:
            outputs: the model's training output: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4]
                cxcywh, ``pred_corners`` [B, Q, 4 * R], ``ref_points`` [B, Q, 4], ``up``, ``reg_scale``;
                ``aux_outputs`` (dicts with also ``teacher_corners``, ``teacher_logits``), ``pre_outputs``,
                ``enc_aux_outputs``, ``enc_meta``; with denoising ``dn_outputs``, ``dn_pre_outputs``,
                ``dn_meta``.
            targets: B dicts with ``labels`` [N] int64 and ``boxes`` [N, 4] cxcywh in 0..1.
            **meta: epoch, step, ...: accepted and unused.

        Returns:
            ``{loss_vfl, loss_bbox, ..., loss_vfl_aux_0, ..., loss_ddf_dn_1, ...}``: weighted float32 scalars.
            Every call with the same model settings returns the same keys: when ``dn_meta`` is present but
            the batch gave no denoising queries (no boxes on this rank), the denoising terms are zeros built
            from the regular outputs (``0 * pred.sum()``), so every rank's graph reaches the same parameters
            under DDP.
        """
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(
                f"pred_logits has {outputs['pred_logits'].shape[-1]} classes but the criterion was built "
                f"with num_classes={self.num_classes}; both must use the config's num_classes."
            )
        device = outputs["pred_logits"].device
        with torch.autocast(device.type, enabled=False):
            matching, context, num_boxes, num_union = self._prepare(outputs, targets)
            norms = (num_boxes, num_union)
            losses = self._decoder_losses(outputs, matching, context, norms)
            losses.update(self._pre_losses(outputs, matching, context, norms))
            losses.update(self._enc_losses(outputs, matching, context, norms))
            losses.update(self._dn_losses(outputs, matching, context, num_boxes))
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

    def _prepare(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[Matching, BatchContext, float, float]:
        """Match, and gather what every output group shares: targets, normalisers, DDF weights."""
        device = outputs["pred_logits"].device
        matching = self.match(outputs, targets)
        num_targets = sum(int(t["labels"].shape[0]) for t in targets)
        num_boxes, num_union = (
            max(v, 1.0) for v in _average_over_ranks([num_targets, len(matching.union)], device)
        )
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float().reshape(-1, 4)
        batch_size, num_queries = outputs["pred_boxes"].shape[:2]
        # DDF weighs its halves by this rank's union size, as the original does (not averaged over ranks)
        positive, total = 4 * len(matching.union), 4 * batch_size * num_queries
        scale = _DDF_REFERENCE_BATCH / batch_size
        context = BatchContext(
            labels=torch.cat([t["labels"] for t in targets]).to(device).long(),
            target_boxes=target_boxes,
            target_xyxy=box_cxcywh_to_xyxy(target_boxes),
            up=outputs.get("up"),
            reg_scale=outputs.get("reg_scale"),
            ddf_weights=((positive * scale) ** 0.5, ((total - positive) * scale) ** 0.5),
        )
        return matching, context, num_boxes, num_union

    def _terms(
        self, output: Mapping[str, Tensor], supervision: Supervision, context: BatchContext, suffix: str
    ) -> dict[str, Tensor]:
        terms = output_terms(output, supervision, context, self._settings)
        return {
            key + suffix: value * self.weight_dict[key]
            for key, value in terms.items()
            if key in self.weight_dict
        }

    def _fgl(self, output: Mapping[str, Tensor], pairs: Pairs, context: BatchContext) -> FglTargets | None:
        if "local" not in self.losses or "pred_corners" not in output:
            return None
        return fgl_targets(output, pairs, context, self.reg_max)

    # ------------------------------------------------------------------------------------------ output groups
    def _decoder_losses(
        self,
        outputs: Mapping[str, Any],
        matching: Matching,
        context: BatchContext,
        norms: tuple[float, float],
    ) -> dict[str, Tensor]:
        """Final layer (no suffix) and earlier decoder layers (``_aux_i``): class terms on each layer's own
        match, box and localization terms on the union."""
        # all decoder layers decode from the same reference points: the final layer's FGL targets serve all
        # (on the union; without it each layer's own pairs need their own targets)
        fgl = self._fgl(outputs, matching.union, context) if self.use_uni_set else None
        layers = [("", "main", outputs)]
        layers += [(f"_aux_{i}", f"aux_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", ()))]
        losses = {}
        for suffix, name, layer in layers:
            box_pairs, class_norm, box_norm = self._box_supervision(matching, name, norms)
            layer_fgl = fgl if self.use_uni_set else self._fgl(outputs, box_pairs, context)
            supervision = Supervision(matching.own[name], box_pairs, class_norm, box_norm, fgl=layer_fgl)
            losses.update(self._terms(layer, supervision, context, suffix))
        return losses

    def _pre_losses(
        self,
        outputs: Mapping[str, Any],
        matching: Matching,
        context: BatchContext,
        norms: tuple[float, float],
    ) -> dict[str, Tensor]:
        """The pre-decoder head (``_pre``): its own match for classes, the union for boxes."""
        if "pre_outputs" not in outputs:
            return {}
        box_pairs, class_norm, box_norm = self._box_supervision(matching, "pre", norms)
        supervision = Supervision(matching.own["pre"], box_pairs, class_norm, box_norm)
        return self._terms(outputs["pre_outputs"], supervision, context, "_pre")

    def _enc_losses(
        self,
        outputs: Mapping[str, Any],
        matching: Matching,
        context: BatchContext,
        norms: tuple[float, float],
    ) -> dict[str, Tensor]:
        """Encoder proposals (``_enc_i``); a class-agnostic encoder is scored against class 0 for all."""
        labels = torch.zeros_like(context.labels) if _class_agnostic(outputs) else None
        losses = {}
        for i, enc in enumerate(outputs.get("enc_aux_outputs", ())):
            box_pairs, class_norm, box_norm = self._box_supervision(matching, f"enc_{i}", norms)
            supervision = Supervision(
                matching.own[f"enc_{i}"], box_pairs, class_norm, box_norm, labels=labels
            )
            losses.update(self._terms(enc, supervision, context, f"_enc_{i}"))
        return losses

    def _dn_losses(
        self, outputs: Mapping[str, Any], matching: Matching, context: BatchContext, num_boxes: float
    ) -> dict[str, Tensor]:
        """Denoising layers (``_dn_i``) and pre head (``_dn_pre``), supervised by the noised-copy pairs."""
        if "dn_outputs" in outputs and "dn_meta" not in outputs:
            raise KeyError(
                "outputs has 'dn_outputs' but no 'dn_meta'; the criterion needs both to pair them."
            )
        if "dn_meta" not in outputs:
            return {}
        pairs = matching.denoising
        if pairs is None:
            return self._zero_dn_losses(outputs)
        # normalised by the (rank-averaged) number of targets times the number of groups, as in the original
        norm = num_boxes * int(outputs["dn_meta"]["dn_num_group"])
        layers = outputs["dn_outputs"]
        # the original computes the denoising FGL targets once, from the first denoising layer's references
        fgl = self._fgl(layers[0], pairs, context) if layers else None
        losses = {}
        for i, layer in enumerate(layers):
            losses.update(
                self._terms(layer, Supervision(pairs, pairs, norm, norm, fgl=fgl), context, f"_dn_{i}")
            )
        if "dn_pre_outputs" in outputs:
            supervision = Supervision(pairs, pairs, norm, norm)
            losses.update(self._terms(outputs["dn_pre_outputs"], supervision, context, "_dn_pre"))
        return losses

    def _zero_dn_losses(self, outputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """The denoising keys as zeros on the regular outputs.

        A batch without boxes gives no denoising queries, but under DDP every rank must return the same terms
        from a graph over the same parameters.
        """
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


@LOSSES.register()
class DEIMCriterion(DFINECriterion):
    """DEIM's loss: D-FINE's, plus the Matchability-Aware Loss (``mal``) and a switch for the union set.

    DEIM's configs use ``losses: [mal, boxes, local]``, ``weight_dict: {loss_mal: 1, loss_bbox: 5,
    loss_giou: 2, loss_fgl: 0.15, loss_ddf: 1.5}`` and ``gamma: 1.5``. Arguments as
    :class:`DFINECriterion`, plus:

    Args:
        mal_alpha: factor on MAL's negative weight (None: 1).
        use_uni_set: supervise box and localization terms on the union of all layers' matches (GO-LSD, as
            D-FINE); False: each output on its own match, normalised by the number of targets.
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
        mal_alpha: float | None = None,
        use_uni_set: bool = True,
    ) -> None:
        super().__init__(
            matcher, weight_dict, losses, alpha, gamma, num_classes, reg_max, boxes_weight_format,
            share_matched_indices,
        )  # fmt: skip
        self.mal_alpha = None if mal_alpha is None else float(mal_alpha)
        self.use_uni_set = bool(use_uni_set)


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
                f"weight_dict key '{key}' is not a loss term.{did_you_mean(key, known)} "
                f"Valid: {', '.join(sorted(known))}."
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


def _average_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` averaged over the ranks of the default process group (as is without one); one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()
