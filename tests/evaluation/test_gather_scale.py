"""Evaluation at scale: detections are capped per category at the evaluator's maximum without changing AP."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO, COCOeval_faster

from dfine.evaluation.coco_evaluator import CocoEvaluator

GROUND_TRUTH = {
    "images": [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2)],
    "annotations": [
        {
            "id": k + 1,
            "image_id": 1 + k % 2,
            "category_id": 1 + k % 3,
            "bbox": [10 * k, 5 * k, 30, 40],
            "area": 1200,
            "iscrowd": 0,
        }
        for k in range(12)
    ],
    "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
}


def _predictions(seed: int) -> dict[int, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    predictions = {}
    for image_id in (1, 2):
        count = 160  # above max_detections=20 in every category
        xy = rng.uniform(0, 150, (count, 2)).astype(np.float32)
        predictions[image_id] = {
            "boxes": torch.from_numpy(np.concatenate([xy, xy + rng.uniform(20, 45, (count, 2))], axis=1)),
            "scores": torch.from_numpy(rng.random(count).astype(np.float32)),
            "labels": torch.from_numpy(np.array([1, 2, 3, 1])[rng.integers(0, 4, count)]),
        }
    return predictions


def _reference_stats(predictions, max_detections: int) -> list[float]:
    """faster-coco-eval on every detection, uncapped."""
    results = []
    for image_id, p in predictions.items():
        for (x1, y1, x2, y2), score, label in zip(
            p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(GROUND_TRUTH)
        evaluation = COCOeval_faster(gt, gt.loadRes(results), iouType="bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats[:12]]


@pytest.mark.parametrize("seed", [0, 1])
def test_capping_each_category_at_max_detections_keeps_ap_and_drops_rows(seed):
    predictions = _predictions(seed)
    evaluator = CocoEvaluator(GROUND_TRUTH, max_detections=20)
    evaluator.update(predictions)
    kept = evaluator._detections[1]
    assert len(kept) == 60 and np.bincount(kept[:, 5].astype(int)).tolist() == [0, 20, 20, 20]
    best_of_1 = np.sort(predictions[1]["scores"][predictions[1]["labels"] == 1].numpy())[-20:]
    assert np.array_equal(np.sort(kept[kept[:, 5] == 1, 4]), best_of_1)  # the highest scores stay
    metrics = evaluator.summarize()
    assert list(metrics.values())[:12] == pytest.approx(_reference_stats(predictions, 20), abs=1e-9)
