"""CocoEvaluator: AP equals pycocotools' COCOeval, hand-built known values, id/box mapping, empty inputs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dfine
from dfine.config.registry import ConfigError
from dfine.evaluation.coco_evaluator import (
    METRIC_NAMES,
    CocoEvaluator,
    build_evaluator,
    check_result_ids,
    score_results_file,
)


def ground_truth(boxes_per_image: dict[int, list[tuple[list[float], int]]], categories=(1,)) -> dict:
    annotations = []
    for image_id, objects in boxes_per_image.items():
        for box, category in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": list(box),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i, "width": 200, "height": 150} for i in boxes_per_image],
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
        "annotations": annotations,
    }


def prediction(boxes_xyxy, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def pycocotools_stats(gt: dict, results: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluation = COCOeval(coco_gt, coco_dt, "bbox")
        evaluation.params.imgIds = sorted({image["id"] for image in gt["images"]})
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def test_perfect_detections_give_ap_one():
    gt = ground_truth({1: [([10, 10, 50, 40], 1)], 2: [([60, 20, 100, 100], 1), ([5, 5, 20, 20], 1)]})
    evaluator = CocoEvaluator(gt)
    evaluator.update(
        {
            1: prediction([[10, 10, 60, 50]], [0.9], [1]),
            2: prediction([[60, 20, 160, 120], [5, 5, 25, 25]], [0.8, 0.7], [1, 1]),
        }
    )
    metrics = evaluator.summarize()
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)
    assert evaluator.per_class == [{"category_id": 1, "name": "class1", "AP": 1.0, "AP50": 1.0}]


def test_half_the_objects_found_first_gives_the_known_interpolated_ap():
    # One exact hit ranked first, one false positive, one missed object: precision 1 up to recall 0.5, so
    # 51 of COCO's 101 recall points score 1.
    gt = ground_truth({1: [([10, 10, 50, 40], 1)], 2: [([60, 20, 40, 40], 1)]})
    evaluator = CocoEvaluator(gt)
    evaluator.update({1: prediction([[10, 10, 60, 50], [150, 100, 190, 140]], [0.9, 0.8], [1, 1])})
    evaluator.update({2: prediction([], [], [])})
    metrics = evaluator.summarize()
    assert metrics["AP"] == pytest.approx(51 / 101)
    assert metrics["AP50"] == pytest.approx(51 / 101)
    assert metrics["AR100"] == pytest.approx(0.5)


def random_case(seed: int = 0) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    rng = np.random.default_rng(seed)
    categories = (1, 5, 9)  # non-contiguous ids, as COCO's
    objects: dict[int, list] = {}
    predictions = {}
    for image_id in range(10, 18):
        count = int(rng.integers(0, 6))
        objects[image_id] = []
        boxes, scores, labels = [], [], []
        for _ in range(count):
            w, h = rng.uniform(4, 120), rng.uniform(4, 100)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 150 - h)
            category = int(rng.choice(categories))
            objects[image_id].append(([x, y, w, h], category))
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
                scores.append(rng.random())
                labels.append(category if rng.random() < 0.85 else int(rng.choice(categories)))
        for _ in range(int(rng.integers(0, 4))):  # false positives
            x, y = rng.uniform(0, 150), rng.uniform(0, 100)
            boxes.append([x, y, x + rng.uniform(5, 50), y + rng.uniform(5, 50)])
            scores.append(rng.random())
            labels.append(int(rng.choice(categories)))
        predictions[image_id] = prediction(boxes, scores, labels)
    gt = ground_truth(objects, categories)
    gt["annotations"][0]["iscrowd"] = 1
    return gt, predictions


def test_random_detections_score_exactly_as_pycocotools():
    gt, predictions = random_case()
    evaluator = CocoEvaluator(gt)
    evaluator.update(predictions)
    metrics = evaluator.summarize()
    expected = pycocotools_stats(gt, evaluator.to_coco_results())
    np.testing.assert_allclose([metrics[name] for name in METRIC_NAMES], expected[:12], atol=1e-9)
    assert 0.05 < metrics["AP"] < 0.95  # a case where the comparison means something


def test_results_keep_category_ids_and_convert_xyxy_to_xywh():
    gt = ground_truth({7: [([10, 20, 30, 40], 90)]}, categories=(90,))
    evaluator = CocoEvaluator(gt)
    evaluator.update({7: prediction([[10.5, 20.25, 40.5, 60.75]], [0.5], [90])})
    assert evaluator.to_coco_results() == [
        {"image_id": 7, "category_id": 90, "bbox": [10.5, 20.25, 30.0, 40.5], "score": 0.5}
    ]


def test_contiguous_labels_instead_of_category_ids_are_reported():
    gt = ground_truth({1: [([10, 20, 30, 40], 90)]}, categories=(90,))
    evaluator = CocoEvaluator(gt)
    evaluator.update({1: prediction([[10, 20, 40, 60]], [0.5], [0])})
    with pytest.raises(ValueError, match="category ids"):
        evaluator.summarize()


def test_result_ids_unknown_to_the_ground_truth_are_named():
    check_result_ids(
        np.array([1, 2, 2]), np.array([90, 1]), known_image_ids=[1, 2, 3], known_category_ids=[1, 90]
    )
    with pytest.raises(ValueError, match=r"1 image ids are not in the annotation file, e.g. \[42\]"):
        check_result_ids(np.array([1, 42]), np.array([1, 1]), [1, 2], [1])
    with pytest.raises(ValueError, match=r"predicted category ids \[0, 7\] .*its ids: \[1, 90\]"):
        check_result_ids(np.array([1, 1, 1]), np.array([7.0, 0.0, 90.0]), [1], [90, 1])


def test_missing_or_malformed_json_files_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*gt\.json"):
        CocoEvaluator(tmp_path / "gt.json")
    (tmp_path / "gt.json").write_text("{")
    with pytest.raises(ConfigError, match=r"gt\.json: not valid JSON"):
        CocoEvaluator(tmp_path / "gt.json")
    gt = ground_truth({1: [([10, 20, 30, 40], 1)]})
    with pytest.raises(FileNotFoundError, match=r"results file not found: .*results\.json"):
        score_results_file(tmp_path / "results.json", gt)
    (tmp_path / "results.json").write_text("[{]")
    with pytest.raises(ConfigError, match=r"results\.json: not valid JSON"):
        score_results_file(tmp_path / "results.json", gt)


def test_empty_predictions_give_zero_ap_without_crashing():
    gt = ground_truth({1: [([10, 20, 30, 40], 1)]})
    evaluator = CocoEvaluator(gt)
    evaluator.update({1: prediction([], [], [])})
    assert evaluator.summarize()["AP"] == 0.0
    assert CocoEvaluator(gt).summarize()["AP"] == 0.0  # nothing updated at all


def test_an_image_seen_twice_keeps_its_first_detections():
    gt = ground_truth({1: [([10, 10, 40, 30], 1)]})
    evaluator = CocoEvaluator(gt)
    evaluator.update({1: prediction([[10, 10, 50, 40]], [0.9], [1])})
    evaluator.update({1: prediction([[100, 100, 140, 130]], [0.9], [1])})
    assert len(evaluator.to_coco_results()) == 1
    assert evaluator.summarize()["AP"] == pytest.approx(1.0)


def test_external_results_file_is_scored_with_the_same_code(tmp_path: Path):
    gt, predictions = random_case(seed=1)
    evaluator = CocoEvaluator(gt)
    evaluator.update(predictions)
    metrics = evaluator.summarize()
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(evaluator.to_coco_results()))
    annotations_path = tmp_path / "annotations.json"
    annotations_path.write_text(json.dumps(gt))
    external = score_results_file(results_path, annotations_path)
    assert external.metrics == pytest.approx(metrics)
    assert "class5" in external.per_class_table()


def test_the_evaluator_block_is_built_with_its_arguments() -> None:
    gt = ground_truth({1: [([10, 10, 50, 40], 1)]})
    evaluator = build_evaluator({"type": "CocoEvaluator", "iou_types": ["bbox"], "max_detections": 7}, gt)
    assert isinstance(evaluator, CocoEvaluator) and evaluator.max_detections == 7
    assert build_evaluator(None, gt).max_detections == 100
    with pytest.raises(ConfigError, match=r"evaluator.*only \[bbox\].*\['segm'\]"):
        build_evaluator({"type": "CocoEvaluator", "iou_types": ["segm"]}, gt)


def test_a_misspelt_evaluator_argument_fails_when_the_config_is_loaded() -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yml"
    with pytest.raises(
        ConfigError, match=r"evaluator\.iou_type is not an argument of CocoEvaluator.*iou_types"
    ):
        dfine.load_config(config, ["evaluator.iou_type=[bbox]"])
    with pytest.raises(ConfigError, match=r"unknown evaluator type 'LvisEvaluator'.*CocoEvaluator"):
        dfine.load_config(config, ["evaluator.type=LvisEvaluator"])
