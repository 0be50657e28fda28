"""DFINEPostProcessor on hand-computed examples and against the original."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from dfine.models.postprocessor import COCO80_TO_COCO91, DFINEPostProcessor

# 2 queries x 3 classes with sigmoid scores 0.9 0.5 0.25 / 0.1 0.75 0.1
LOGITS = torch.tensor([[[math.log(9), 0.0, -math.log(3)], [-math.log(9), math.log(3), -math.log(9)]]])
BOXES = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])  # cxcywh
SIZE = torch.tensor([[200, 100]])  # (w, h)
# query 0 -> xyxy (0.4, 0.3, 0.6, 0.7) * (200, 100) ; query 1 -> (0, 0.5, 0.5, 1.0) * (200, 100)
QUERY_BOXES_PX = torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])


def test_top_pairs_over_queries_and_classes_with_boxes_in_pixels() -> None:
    post = DFINEPostProcessor(num_classes=3, num_top_queries=3)
    (result,) = post({"pred_logits": LOGITS, "pred_boxes": BOXES}, SIZE)
    assert list(result) == ["labels", "boxes", "scores"]
    # flattened scores 0.9 (q0 c0), 0.5 (q0 c1), 0.25, 0.1, 0.75 (q1 c1), 0.1 -> best three
    assert_close(result["scores"], torch.tensor([0.9, 0.75, 0.5]))
    assert result["labels"].tolist() == [0, 1, 1]
    assert_close(result["boxes"], QUERY_BOXES_PX[[0, 1, 0]])


def test_labels_are_mapped_to_category_ids() -> None:
    post = DFINEPostProcessor(num_classes=3, num_top_queries=3, label_to_category=(5, 7, 9))
    (result,) = post({"pred_logits": LOGITS, "pred_boxes": BOXES}, SIZE)
    assert result["labels"].tolist() == [5, 7, 7]


def test_coco_remap_uses_the_official_ids() -> None:
    assert len(COCO80_TO_COCO91) == 80 and COCO80_TO_COCO91[11] == 13 and COCO80_TO_COCO91[79] == 90
    logits = torch.full((1, 1, 80), -10.0)
    logits[0, 0, 79] = 10.0
    post = DFINEPostProcessor(num_classes=80, num_top_queries=1, remap_mscoco_category=True)
    (result,) = post({"pred_logits": logits, "pred_boxes": BOXES[:, :1]}, SIZE)
    assert result["labels"].tolist() == [90]


def test_coco_ids_from_torchvision_equal_the_table_written_out_before() -> None:
    # The ids used to be written out by hand; torchvision's COCO table must give exactly these.
    written_out = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70)
    assert (*written_out, *range(72, 83), *range(84, 91)) == COCO80_TO_COCO91


def test_inverted_boxes_stay_inverted_as_in_the_original() -> None:
    # Not clamped (unlike the losses' conversion): COCO evaluation ignores a box of negative area.
    post = DFINEPostProcessor(num_classes=3, num_top_queries=1)
    inverted = torch.tensor([[[0.5, 0.5, -0.2, 0.4], [0.5, 0.5, 0.2, 0.4]]])
    (result,) = post({"pred_logits": LOGITS, "pred_boxes": inverted}, SIZE)
    assert_close(result["boxes"], torch.tensor([[120.0, 30.0, 80.0, 70.0]]))


def test_deploy_mode_returns_batched_tensors_equal_to_the_per_image_results() -> None:
    logits, boxes = torch.cat((LOGITS, LOGITS.flip(1))), torch.cat((BOXES, BOXES.flip(1)))
    sizes = torch.tensor([[200, 100], [50, 60]])
    post = DFINEPostProcessor(num_classes=3, num_top_queries=4, label_to_category=(5, 7, 9))
    results = post({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    labels, boxes_px, scores = post.deploy()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert labels.shape == (2, 4) and boxes_px.shape == (2, 4, 4) and scores.shape == (2, 4)
    for index, result in enumerate(results):
        assert torch.equal(labels[index], result["labels"])
        assert_close(boxes_px[index], result["boxes"])
        assert_close(scores[index], result["scores"])


def test_softmax_scores_skip_the_background_class() -> None:
    # probabilities q0: 0.6 0.3 | 0.1 (background), q1: 0.1 0.7 | 0.2
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.1, 0.7, 0.2]]]))
    post = DFINEPostProcessor(num_classes=2, use_focal_loss=False, num_top_queries=2)
    (result,) = post({"pred_logits": logits, "pred_boxes": BOXES}, SIZE)
    assert_close(result["scores"], torch.tensor([0.7, 0.6]))
    assert result["labels"].tolist() == [1, 0]
    assert_close(result["boxes"], QUERY_BOXES_PX[[1, 0]])


def test_more_top_queries_than_pairs_keeps_them_all() -> None:
    (result,) = DFINEPostProcessor(num_classes=3)({"pred_logits": LOGITS, "pred_boxes": BOXES}, SIZE)
    assert result["scores"].shape == (6,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remap_mscoco_category": True, "label_to_category": (1, 2, 3)}, "not both"),
        ({"label_to_category": (1, 2)}, "2 entries"),
    ],
)
def test_bad_label_tables_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DFINEPostProcessor(num_classes=3, **kwargs)


@pytest.mark.original
@pytest.mark.parametrize("remap", [False, True])
def test_detections_equal_the_original(original: Any, remap: bool) -> None:
    from src.zoo.dfine.postprocessor import DFINEPostProcessor as OriginalPostProcessor

    generator = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 50, 80, generator=generator) * 3,
        "pred_boxes": torch.rand(2, 50, 4, generator=generator) * 0.5 + 0.1,
    }
    sizes = torch.tensor([[640, 480], [333, 500]])
    kwargs = {"num_classes": 80, "num_top_queries": 30, "remap_mscoco_category": remap}
    ours = DFINEPostProcessor(**kwargs)(outputs, sizes)
    theirs = OriginalPostProcessor(**kwargs)(outputs, sizes)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine["labels"], reference["labels"])
        assert_close(mine["boxes"], reference["boxes"])
        assert_close(mine["scores"], reference["scores"])
    ours_deployed = DFINEPostProcessor(num_classes=80, num_top_queries=30).deploy()(outputs, sizes)
    theirs_deployed = OriginalPostProcessor(num_classes=80, num_top_queries=30).deploy()(outputs, sizes)
    for mine, reference in zip(ours_deployed, theirs_deployed, strict=True):
        assert_close(mine, reference)
