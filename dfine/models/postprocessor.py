"""Turn the model's raw outputs into per-image detections in pixels of the original image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from dfine.config.registry import MODELS, ConfigError
from dfine.models.coco_categories import COCO80_TO_COCO91

__all__ = ["COCO80_TO_COCO91", "DFINEPostProcessor", "Detections"]


class Detections(TypedDict):
    """Detections of one image, best first."""

    labels: Tensor  # [K] int64 class (or dataset category id when a table is given)
    boxes: Tensor  # [K, 4] xyxy in pixels of the original image
    scores: Tensor  # [K] in 0..1


@MODELS.register()
class DFINEPostProcessor(nn.Module):
    """Pick the best (query, class) pairs and scale their boxes to the original image.

    Args:
        num_classes: C, the number of object classes (``pred_logits`` has C + 1 columns without focal loss).
        use_focal_loss: scores are per-class sigmoids (True), or a softmax whose last class is background.
        num_top_queries: K detections kept per image (capped at what the outputs hold).
        remap_mscoco_category: map the 80 contiguous COCO labels to COCO's official category ids.
        label_to_category: dataset category id of each contiguous label 0..C-1 (give either this or
            ``remap_mscoco_category``).

    Raises:
        ValueError: both label tables requested, or a table shorter than ``num_classes``.
    """

    def __init__(
        self,
        num_classes: int = 80,
        use_focal_loss: bool = True,
        num_top_queries: int = 300,
        remap_mscoco_category: bool = False,
        label_to_category: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if remap_mscoco_category and label_to_category is not None:
            raise ConfigError("give either remap_mscoco_category=True or label_to_category, not both")
        table = COCO80_TO_COCO91 if remap_mscoco_category else label_to_category
        if table is not None and len(table) < num_classes:
            raise ValueError(
                f"label_to_category has {len(table)} entries but num_classes is {num_classes}; "
                "give one category id per class"
            )
        self.num_classes = int(num_classes)
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category
        self.deploy_mode = False
        # Not persistent: the table is configuration, and the original post-processor has no state.
        category_ids = None if table is None else torch.tensor(list(table), dtype=torch.int64)
        self.register_buffer("category_ids", category_ids, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, use_focal_loss={self.use_focal_loss}, "
            f"num_top_queries={self.num_top_queries}, remap={self.category_ids is not None}"
        )

    def deploy(self) -> DFINEPostProcessor:
        """Eval mode returning ``(labels, boxes, scores)`` tensors instead of dicts (for ONNX export)."""
        self.eval()
        self.deploy_mode = True
        return self

    def forward(
        self, outputs: dict[str, Tensor], orig_target_sizes: Tensor
    ) -> list[Detections] | tuple[Tensor, Tensor, Tensor]:
        """Select detections.

        Args:
            outputs: ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] cxcywh in 0..1.
            orig_target_sizes: [B, 2] (width, height) of each original image, in pixels.

        Returns:
            One :class:`Detections` per image, or in deploy mode ``(labels [B, K], boxes [B, K, 4], scores
            [B, K])``. Labels are mapped to category ids when a table was given (in both modes).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        # Not clamped, like the original: a box with negative width stays inverted and COCO eval ignores it.
        boxes_px = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
        boxes_px = boxes_px * orig_target_sizes.repeat(1, 2).unsqueeze(1)  # [B, Q, 4] xyxy pixels
        if self.use_focal_loss:
            scores, labels, index = self._top_focal(logits)
        else:
            scores, labels, index = self._top_softmax(logits)
        boxes_px = boxes_px.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
        if self.category_ids is not None:
            labels = self.category_ids[labels]
        if self.deploy_mode:
            return labels, boxes_px, scores
        return [
            Detections(labels=image_labels, boxes=image_boxes, scores=image_scores)
            for image_labels, image_boxes, image_scores in zip(labels, boxes_px, scores, strict=True)
        ]

    def _top_focal(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Best (query, class) pairs over all classes: scores, labels, query index, each [B, K]."""
        scores = torch.sigmoid(logits).flatten(1)  # [B, Q * C]
        scores, flat_index = scores.topk(min(self.num_top_queries, scores.shape[1]), dim=-1)
        # a - a // b * b instead of %, which older TensorRT versions cannot export.
        labels = flat_index - flat_index // self.num_classes * self.num_classes
        return scores, labels, flat_index // self.num_classes

    def _top_softmax(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Best class per query (background excluded), then the best queries: scores, labels, index [B, K]."""
        scores, labels = F.softmax(logits, dim=-1)[..., :-1].max(dim=-1)  # [B, Q]
        scores, index = scores.topk(min(self.num_top_queries, scores.shape[1]), dim=-1)
        return scores, labels.gather(1, index), index
