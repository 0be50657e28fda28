"""``evaluate``: labels reach COCO eval as the dataset's category ids, with or without the COCO remap."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dfine.data.label_map import LabelMap
from dfine.evaluation.loop import evaluate
from dfine.models.coco_categories import COCO_NAMES
from dfine.models.postprocessor import COCO80_TO_COCO91, DFINEPostProcessor

SIZE = 64
# (category id, cx, cy, w, h) normalised; bicycle (2), car (3) and toothbrush (90, COCO's last id)
TRUTH = [[(2, 0.3, 0.3, 0.2, 0.2), (90, 0.7, 0.7, 0.3, 0.2)], [(3, 0.5, 0.5, 0.4, 0.4)]]


class CocoLikeDataset:
    def __init__(self) -> None:
        self.label_map = LabelMap(
            [{"id": i, "name": n} for i, n in zip(COCO80_TO_COCO91, COCO_NAMES, strict=True)]
        )

    def __len__(self) -> int:
        return len(TRUTH)

    def to_coco_dict(self) -> dict[str, Any]:
        annotations = []
        for image_id, boxes in enumerate(TRUTH):
            for category, cx, cy, w, h in boxes:
                x, y = (cx - w / 2) * SIZE, (cy - h / 2) * SIZE
                box = [x, y, w * SIZE, h * SIZE]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
        return {
            "images": [{"id": i, "width": SIZE, "height": SIZE} for i in range(len(TRUTH))],
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in zip(COCO80_TO_COCO91, COCO_NAMES, strict=True)],
        }


class Loader:
    dataset = CocoLikeDataset()

    def __iter__(self):  # one batch of both images
        targets = [
            {"image_id": torch.tensor(i), "orig_size": torch.tensor([SIZE, SIZE])} for i in range(len(TRUTH))
        ]
        yield torch.zeros(len(TRUTH), 3, SIZE, SIZE), targets


class Oracle(torch.nn.Module):
    """Predicts every true box with its contiguous label (the position of its id in COCO's 80)."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = torch.full((len(images), 4, 80), -10.0)
        boxes = torch.full((len(images), 4, 4), 0.5)
        for row, truth in enumerate(TRUTH):
            for query, (category, *box) in enumerate(truth):
                logits[row, query, COCO80_TO_COCO91.index(category)] = 5.0
                boxes[row, query] = torch.tensor(box)
        return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.mark.parametrize("remap", [False, True], ids=["contiguous_labels", "remap_mscoco_category"])
@pytest.mark.parametrize("from_checkpoint", [False, True], ids=["dataset_map", "checkpoint_map"])
def test_an_oracle_scores_ap_1_with_or_without_the_coco_remap(remap: bool, from_checkpoint: bool) -> None:
    # dfine-eval passes the checkpoint's label map as category_ids; the remap must still apply only once
    category_ids = list(COCO80_TO_COCO91) if from_checkpoint else None
    postprocessor = DFINEPostProcessor(num_classes=80, num_top_queries=10, remap_mscoco_category=remap)
    metrics = evaluate(Oracle(), postprocessor, Loader(), torch.device("cpu"), category_ids=category_ids)
    assert metrics["AP"] == pytest.approx(1.0)
    per_class = {row["category_id"]: row["AP"] for row in metrics["per_class"] if row["AP"] is not None}
    assert per_class == pytest.approx({2: 1.0, 3: 1.0, 90: 1.0})
