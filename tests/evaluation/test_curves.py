"""detection_curves: hand-worked PR / F1 values, crowd handling, empty inputs, AP50 equal to COCOeval's."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import pytest

from dfine.evaluation.curves import DetectionCurves, detection_curves


def ground_truth(objects: dict[int, list[tuple]], categories=(1,)) -> dict:
    """``objects``: ``{image_id: [(xywh box, category_id[, iscrowd])]}``."""
    annotations = []
    for image_id, rows in objects.items():
        for box, category, *crowd in rows:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": list(box),
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(crowd[0]) if crowd else 0,
                }
            )
    return {
        "images": [{"id": i, "width": 320, "height": 240} for i in objects],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
    }


def result(image_id: int, box, score: float, category: int = 1) -> dict:
    return {"image_id": image_id, "category_id": category, "bbox": list(box), "score": score}


def at(curves: DetectionCurves, threshold: float) -> int:
    index = int(np.argmin(np.abs(curves.confidence_grid - threshold)))
    assert abs(curves.confidence_grid[index] - threshold) < 1e-9, "threshold must lie on the grid"
    return index


@pytest.fixture
def two_images() -> tuple[dict, list[dict]]:
    """3 ground-truth boxes; detections by score: TP 0.9, duplicate FP 0.8, TP (IoU 0.82) 0.7, FP 0.6."""
    gt = ground_truth({1: [([0, 0, 10, 10], 1), ([20, 20, 10, 10], 1)], 2: [([0, 0, 10, 10], 1)]})
    results = [
        result(2, [50, 50, 10, 10], 0.6),
        result(1, [0, 0, 10, 10], 0.9),
        result(2, [1, 0, 10, 10], 0.7),  # IoU 90 / 110 with image 2's box
        result(1, [0, 0, 10, 10], 0.8),  # same box again: its ground truth is taken, so a false positive
    ]
    return gt, results


def test_precision_recall_and_f1_at_thresholds_match_hand_counts(two_images):
    curves = detection_curves(*two_images)
    expected = {  # threshold: (precision, recall) from the TP, FP, TP, FP order
        0.95: (1.0, 0.0),  # nothing kept: precision 1 by convention
        0.85: (1.0, 1 / 3),
        0.75: (1 / 2, 1 / 3),
        0.65: (2 / 3, 2 / 3),
        0.50: (2 / 4, 2 / 3),
        0.00: (2 / 4, 2 / 3),
    }
    for threshold, (precision, recall) in expected.items():
        index = at(curves, threshold)
        f1 = 2 * precision * recall / (precision + recall)
        np.testing.assert_allclose(curves.precision[0, index], precision, err_msg=f"precision at {threshold}")
        np.testing.assert_allclose(curves.recall[0, index], recall, err_msg=f"recall at {threshold}")
        np.testing.assert_allclose(curves.f1[0, index], f1, err_msg=f"F1 at {threshold}")
    assert curves.num_ground_truth.tolist() == [3]


def test_average_precision_is_the_101_point_envelope_mean(two_images):
    curves = detection_curves(*two_images)
    # Envelope: precision 1 up to recall 1/3 (grid 0.00..0.33, 34 points), 2/3 up to recall 2/3 (0.34..0.66,
    # 33 points), 0 beyond (never reached).
    np.testing.assert_allclose(curves.ap, [(34 * 1 + 33 * 2 / 3) / 101])
    np.testing.assert_allclose(curves.mean_ap, 56 / 101)
    envelope = curves.precision_at_recall[0]
    np.testing.assert_allclose(envelope[:34], 1.0)
    np.testing.assert_allclose(envelope[34:67], 2 / 3)
    np.testing.assert_allclose(envelope[67:], 0.0)
    assert np.all(np.diff(envelope) <= 0), "the interpolated precision must not increase with recall"


def test_best_threshold_is_the_lowest_confidence_of_the_highest_mean_f1(two_images):
    curves = detection_curves(*two_images)
    np.testing.assert_allclose(curves.best_f1, 2 / 3)
    # F1 is 2/3 for thresholds in (0.6, 0.7]; the lowest grid point there is 0.61.
    np.testing.assert_allclose(curves.best_threshold, 0.61)
    assert "best F1 0.667 at confidence 0.61" in curves.describe()


def test_high_iou_threshold_turns_the_shifted_box_into_a_false_positive(two_images):
    curves = detection_curves(*two_images, iou_threshold=0.9)  # the 0.7 detection has IoU 0.82
    index = at(curves, 0.65)
    np.testing.assert_allclose([curves.precision[0, index], curves.recall[0, index]], [1 / 3, 1 / 3])


def test_iou_exactly_at_the_threshold_matches_and_a_perfect_box_matches_at_threshold_one():
    gt = ground_truth({1: [([0, 0, 10, 10], 1)]})
    half = detection_curves(gt, [result(1, [0, 0, 20, 10], 0.9)])  # IoU 100 / 200 = 0.5 exactly
    np.testing.assert_allclose(half.ap, [1.0])
    perfect = detection_curves(gt, [result(1, [0, 0, 10, 10], 0.9)], iou_threshold=1.0)
    np.testing.assert_allclose(perfect.ap, [1.0])


def test_crowd_boxes_are_not_positives_and_detections_on_them_are_ignored():
    gt = ground_truth({1: [([0, 0, 100, 100], 1, 1), ([200, 200, 10, 10], 1)]})
    results = [result(1, [10, 10, 20, 20], 0.9), result(1, [200, 200, 10, 10], 0.5)]
    curves = detection_curves(gt, results)
    assert curves.num_ground_truth.tolist() == [1]
    np.testing.assert_allclose(curves.precision[0, at(curves, 0.0)], 1.0)  # the crowd detection is no FP
    np.testing.assert_allclose(curves.ap, [1.0])
    # The same detection next to a normal box of that size is a false positive.
    plain = ground_truth({1: [([0, 0, 100, 100], 1), ([200, 200, 10, 10], 1)]})
    np.testing.assert_allclose(detection_curves(plain, results).precision[0, at(curves, 0.0)], 0.5)


def test_detection_prefers_a_free_normal_box_over_a_crowd_box():
    gt = ground_truth({1: [([0, 0, 100, 100], 1, 1), ([0, 0, 60, 60], 1)]})
    results = [result(1, [0, 0, 60, 60], 0.9), result(1, [0, 0, 60, 60], 0.8), result(1, [300, 0, 5, 5], 0.7)]
    curves = detection_curves(gt, results)
    # 0.9 takes the normal box, 0.8 lies inside the crowd box (ignored), 0.7 is a false positive.
    np.testing.assert_allclose(curves.precision[0, at(curves, 0.75)], 1.0)
    np.testing.assert_allclose(curves.precision[0, at(curves, 0.65)], 0.5)
    np.testing.assert_allclose(curves.recall[0, at(curves, 0.0)], 1.0)


def test_empty_results_images_without_ground_truth_and_zero_area_boxes_give_finite_zeros():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or empty-mean warnings
        empty = detection_curves(ground_truth({1: [([0, 0, 10, 10], 1)]}), [])
        no_gt = detection_curves(ground_truth({1: []}), [result(1, [0, 0, 10, 10], 0.9)])
        nothing = detection_curves({"images": [], "annotations": [], "categories": []}, [])
        zero_area = detection_curves(
            ground_truth({1: [([5, 5, 0, 10], 1)], 2: []}),
            [result(1, [5, 5, 0, 10], 0.9), result(2, [0, 0, 0, 0], 0.8)],
        )
    for curves in (empty, no_gt, nothing, zero_area):
        for name in ("precision_at_recall", "precision", "recall", "f1", "ap", "mean_f1", "mean_precision"):
            assert np.isfinite(getattr(curves, name)).all(), name
        assert curves.best_f1 == 0.0 and curves.mean_ap == 0.0
    assert empty.has_ground_truth.tolist() == [True] and no_gt.has_ground_truth.tolist() == [False]
    assert zero_area.num_ground_truth.tolist() == [1]  # still a positive, which nothing can match
    assert nothing.precision.shape == (0, 101)


def test_means_skip_categories_without_ground_truth_and_keep_the_category_order():
    gt = ground_truth({1: [([0, 0, 10, 10], 7)], 2: [([0, 0, 10, 10], 7), ([30, 30, 10, 10], 3)]}, (5, 7, 3))
    results = [
        result(1, [0, 0, 10, 10], 0.9, 7),
        result(2, [0, 0, 10, 10], 0.3, 7),
        result(2, [0, 0, 9, 9], 0.8, 5),
    ]
    curves = detection_curves(gt, results)
    assert curves.category_ids == [5, 7, 3] and curves.category_names == ["class5", "class7", "class3"]
    assert curves.has_ground_truth.tolist() == [False, True, True]
    np.testing.assert_allclose(curves.ap, [0.0, 1.0, 0.0])
    np.testing.assert_allclose(curves.mean_ap, 0.5)
    np.testing.assert_allclose(curves.mean_f1, curves.f1[1:].mean(axis=0))
    np.testing.assert_allclose(curves.mean_recall[at(curves, 0.5)], 0.25)  # class 7: 1 of 2, class 3: 0 of 1


def test_image_ids_restrict_the_images_scored(two_images):
    curves = detection_curves(*two_images, image_ids=[2])
    assert curves.num_ground_truth.tolist() == [1]
    index = at(curves, 0.0)
    np.testing.assert_allclose([curves.precision[0, index], curves.recall[0, index]], [0.5, 1.0])


def test_unknown_category_or_image_in_results_raises_naming_it(two_images):
    gt, results = two_images
    with pytest.raises(ValueError, match=r"category ids \[9\]"):
        detection_curves(gt, [*results, result(1, [0, 0, 1, 1], 0.5, category=9)])
    with pytest.raises(ValueError, match=r"\[42\]"):
        detection_curves(gt, [*results, result(42, [0, 0, 1, 1], 0.5)])
    with pytest.raises(ValueError, match="iou_threshold"):
        detection_curves(gt, results, iou_threshold=0.0)


def test_inputs_are_left_as_they_were(two_images):
    gt, results = two_images
    gt["annotations"].append({"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 99, 99], "iscrowd": 1})
    before = copy.deepcopy((gt, results))
    detection_curves(gt, results)
    assert (gt, results) == before  # faster-coco-eval writes into the annotations it is handed


def test_inverted_detection_is_a_false_positive_not_ignored():
    # COCO's area ranges would ignore a box of negative area; the curves count every detection.
    gt = ground_truth({1: [([0, 0, 10, 10], 1)]})
    curves = detection_curves(gt, [result(1, [0, 0, 10, 10], 0.9), result(1, [50, 50, -5, 10], 0.8)])
    np.testing.assert_allclose(curves.precision[0, at(curves, 0.0)], 0.5)


def test_every_detection_counts_even_past_cocos_100_per_image():
    gt = ground_truth({1: [([0, 0, 10, 10], 1)]})
    misses = [result(1, [100 + i, 100, 10, 10], 0.9 - i * 0.001) for i in range(150)]
    curves = detection_curves(gt, [*misses, result(1, [0, 0, 10, 10], 0.5)])  # the hit ranks 151st
    index = at(curves, 0.0)
    np.testing.assert_allclose([curves.recall[0, index], curves.precision[0, index]], [1.0, 1 / 151])


def random_case(seed: int = 0) -> tuple[dict, list[dict]]:
    """Jittered copies of ground truth (some too far off to match), random boxes, one crowd box."""
    rng = np.random.default_rng(seed)
    objects: dict[int, list[tuple]] = {}
    results = []
    for image_id in range(1, 9):
        rows = []
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 250, 2)
            w, h = rng.uniform(8, 70, 2)
            category = int(rng.choice([1, 2, 4]))
            rows.append(([x, y, w, h], category))
            for _ in range(rng.integers(0, 3)):  # 0..2 detections per box, a few of them poor
                good = rng.random() < 0.75
                jitter = rng.normal(0, 0.06 if good else 0.4, 4) * [w, h, w, h]
                box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
                results.append(result(image_id, box, float(rng.uniform(0.3 if good else 0.05, 1)), category))
        for _ in range(rng.integers(0, 3)):
            box = [*rng.uniform(0, 250, 2), *rng.uniform(5, 60, 2)]
            results.append(result(image_id, box, float(rng.uniform(0.05, 0.7)), int(rng.choice([1, 2, 4]))))
        if image_id == 3:
            rows.append(([0, 0, 120, 120], 2, 1))
            results.append(result(image_id, [10, 10, 30, 30], 0.95, 2))
        objects[image_id] = rows
    return ground_truth(objects, categories=(1, 2, 3, 4)), results


def coco_ap50_per_class(module: str, gt: dict, results: list[dict]) -> np.ndarray:
    if module == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    precision = np.asarray(evaluation.eval["precision"])[0, :, :, 0, -1]  # [R, K] at IoU 0.5, all areas
    return np.where((precision > -1).all(axis=0), precision.mean(axis=0), -1.0)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("module", ["pycocotools", "faster_coco_eval"])
def test_per_class_ap50_equals_cocoeval(module, seed):
    gt, results = random_case(seed)
    curves = detection_curves(gt, results)
    expected = coco_ap50_per_class(module, gt, results)
    assert curves.has_ground_truth.tolist() == (expected > -1).tolist()
    assert 0.2 < curves.mean_ap < 0.95, "the case should mix hits and misses"
    # Same matching, same 101-point grid and envelope, so only float rounding differs (COCO adds
    # np.spacing(1) to the precision denominator); a tie in score or IoU, absent here, could move AP by
    # about 1 / num_ground_truth, hence a test case without ties.
    np.testing.assert_allclose(curves.ap[curves.has_ground_truth], expected[expected > -1], atol=1e-6)
