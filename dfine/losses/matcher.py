"""Hungarian matching of predictions to targets (one query per target), as in DETR and D-FINE.

The cost of giving target ``n`` to query ``q`` is
``cost_class * focal_cost(p[q, label_n]) + cost_bbox * L1(box_q, box_n) + cost_giou * -GIoU(box_q, box_n)``;
scipy's ``linear_sum_assignment`` picks the cheapest one-to-one assignment per image.

Only the [targets x queries] block of each image is computed (the original computes every query of the
batch against every target of the batch), in chunks of at most ``max_cost_entries`` entries, and the cost
matrices of all the outputs being matched (final layer, auxiliary layers, encoder) travel to the host in one
copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dfine.config.registry import LOSSES, ConfigError, did_you_mean
from dfine.ops.box_ops import box_cxcywh_to_xyxy, paired_iou_and_giou

__all__ = ["HungarianMatcher", "ImageMatch"]

ImageMatch = tuple[Tensor, Tensor]
"""``(query_index, target_index)`` of one image: [M] int64 CPU tensors, ``query_index`` increasing."""

_COST_NAMES = ("cost_class", "cost_bbox", "cost_giou")


@LOSSES.register()
class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising a class + L1 + GIoU cost.

    Args:
        weight_dict: ``{cost_class, cost_bbox, cost_giou}`` weights of the three costs (D-FINE: 2, 5, 2).
        use_focal_loss: focal-style class cost on sigmoid probabilities (D-FINE); False uses ``-softmax``.
            The original's default is False, but every D-FINE config turns it on through a global key, so here
            it defaults to True.
        alpha, gamma: focal class-cost parameters (D-FINE: 0.25, 2.0).
        max_cost_entries: at most this many cost entries (targets x queries x outputs) are computed at once,
            which bounds the matcher's peak memory (~60 bytes an entry) for images with many targets.

    Examples:
        >>> matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2})
        >>> [(queries, targets)] = matcher(outputs, [{"labels": labels, "boxes": boxes}])
    """

    def __init__(
        self,
        weight_dict: Mapping[str, float],
        use_focal_loss: bool = True,
        alpha: float = 0.25,
        gamma: float = 2.0,
        max_cost_entries: int = 1 << 20,
    ) -> None:
        super().__init__()
        if not isinstance(weight_dict, Mapping):
            raise ConfigError(
                f"matcher weight_dict must be a mapping like {{cost_class: 2, cost_bbox: 5, cost_giou: 2}}, "
                f"got {weight_dict!r}."
            )
        for key in weight_dict:
            if key not in _COST_NAMES:
                raise ConfigError(
                    f"matcher weight_dict key '{key}' is unknown.{did_you_mean(key, _COST_NAMES)} "
                    f"Valid keys: {', '.join(_COST_NAMES)}."
                )
        missing = [name for name in _COST_NAMES if name not in weight_dict]
        if missing:
            raise ConfigError(
                f"matcher weight_dict is missing {missing}; D-FINE uses cost_class 2, cost_bbox 5, "
                "cost_giou 2."
            )
        self.cost_class = float(weight_dict["cost_class"])
        self.cost_bbox = float(weight_dict["cost_bbox"])
        self.cost_giou = float(weight_dict["cost_giou"])
        if self.cost_class == self.cost_bbox == self.cost_giou == 0:
            raise ConfigError("matcher weight_dict: all three costs are 0, so every assignment would tie.")
        if max_cost_entries < 1:
            raise ConfigError(f"matcher max_cost_entries must be >= 1, got {max_cost_entries}.")
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma
        self.max_cost_entries = int(max_cost_entries)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"use_focal_loss={self.use_focal_loss}, alpha={self.alpha}, gamma={self.gamma}"
        )

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> list[ImageMatch]:
        """Match one output.

        Args:
            outputs: ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] cxcywh in 0..1.
            targets: B dicts with ``labels`` [N] int64 and ``boxes`` [N, 4] cxcywh in 0..1 (N may be 0).

        Returns:
            Per image ``(query_index, target_index)``, [min(Q, N)] int64 CPU tensors, sorted by query.
        """
        return self.match_many([outputs], targets)[0]

    @torch.no_grad()
    def match_many(
        self, outputs_list: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> list[list[ImageMatch]]:
        """Match several outputs of the same batch (e.g. every decoder layer) with one device->host copy.

        Args:
            outputs_list: G dicts with ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4], same shapes.
            targets: as in :meth:`forward`.

        Returns:
            G lists (one per output) of B ``(query_index, target_index)`` pairs.
        """
        if not outputs_list:
            return []
        logits = torch.stack([o["pred_logits"] for o in outputs_list]).float()  # [G, B, Q, C]
        boxes = torch.stack([o["pred_boxes"] for o in outputs_list]).float()  # [G, B, Q, 4]
        num_outputs, batch_size = logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {batch_size} predictions.")
        sizes = [int(t["labels"].shape[0]) for t in targets]
        empty: list[ImageMatch] = [_empty_match()] * batch_size
        if sum(sizes) == 0:
            return [list(empty) for _ in range(num_outputs)]
        costs = self._cost_matrices(logits, boxes, targets, sizes).cpu().numpy()  # [N, G, Q]
        matches: list[list[ImageMatch]] = []
        for output in range(num_outputs):
            per_image, start = [], 0
            for size in sizes:
                per_image.append(_solve(costs[start : start + size, output]) if size else _empty_match())
                start += size
            matches.append(per_image)
        return matches

    def _cost_matrices(
        self, logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Tensor]], sizes: list[int]
    ) -> Tensor:
        """[N, G, Q] matching costs of every target (of all images) against its own image's queries."""
        num_outputs, batch_size, num_queries = logits.shape[:3]
        device = logits.device
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # [N]
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()  # [N, 4] cxcywh
        target_xyxy = box_cxcywh_to_xyxy(target_boxes)
        image_of_target = torch.repeat_interleave(  # output_size given: no device->host sync
            torch.arange(batch_size, device=device),
            torch.tensor(sizes, device=device),
            output_size=sum(sizes),
        )
        probs = logits.sigmoid() if self.use_focal_loss else logits.softmax(-1)
        probs_by_class = probs.permute(1, 3, 0, 2)  # [B, C, G, Q]
        pred_boxes = boxes.transpose(0, 1)  # [B, G, Q, 4] cxcywh
        pred_xyxy = box_cxcywh_to_xyxy(pred_boxes)
        rows_per_chunk = max(1, self.max_cost_entries // (num_outputs * num_queries))
        chunks = []
        for start in range(0, labels.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            image = image_of_target[rows]
            prob = probs_by_class[image, labels[rows]]  # [n, G, Q]
            cost_class = self._class_cost(prob)
            cost_bbox = (pred_boxes[image] - target_boxes[rows, None, None, :]).abs().sum(-1)  # [n, G, Q]
            _, giou = paired_iou_and_giou(pred_xyxy[image], target_xyxy[rows, None, None, :])
            chunks.append(self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * -giou)
        # NaN predictions (a diverging model) still get an assignment; the losses will then show the NaN
        return torch.cat(chunks).nan_to_num(nan=1.0)

    def _class_cost(self, prob: Tensor) -> Tensor:
        if not self.use_focal_loss:
            return -prob
        negative = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
        positive = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
        return positive - negative


def _empty_match() -> ImageMatch:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


def _solve(cost: np.ndarray) -> ImageMatch:
    """Optimal assignment for one image's [N, Q] cost block, returned sorted by query."""
    target_index, query_index = linear_sum_assignment(cost)
    order = np.argsort(query_index)
    return torch.from_numpy(query_index[order].astype(np.int64)), torch.from_numpy(
        target_index[order].astype(np.int64)
    )
