"""Precision-recall and F1-vs-confidence curves of a detector on a COCO-format validation set.

faster-coco-eval matches the detections to the ground truth at one IoU threshold (COCOeval's greedy matching)
and gives the interpolated precision on the recall grid, so the per-class AP here is COCOeval's AP50. Its list
of matches gives each detection's status, from which the precision, recall and F1 at every confidence
threshold follow: they tell which score threshold to deploy with. :mod:`dfine.engine.plots` draws them.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from dfine.evaluation.coco_evaluator import check_result_ids

__all__ = ["DetectionCurves", "detection_curves"]

logger = logging.getLogger(__name__)

# A detection's match status.
_FALSE_POSITIVE, _TRUE_POSITIVE, _IGNORED = 0, 1, -1


@dataclass(frozen=True)
class DetectionCurves:
    """Per-class and mean detection curves at one IoU threshold.

    Rows are categories in the order of ``coco_gt["categories"]``. Categories without (non-crowd) ground
    truth keep all-zero rows and are left out of every mean (see ``has_ground_truth``); nothing is NaN.

    Attributes:
        iou_threshold: a detection and a ground-truth box match when their IoU is >= this.
        category_ids: [C] COCO category ids.
        category_names: [C] their names.
        num_ground_truth: [C] int, non-crowd ground-truth boxes per class (the positives).
        has_ground_truth: [C] bool, ``num_ground_truth > 0``.
        recall_grid: [R] recall values 0..1 at which ``precision_at_recall`` is sampled.
        precision_at_recall: [C, R] interpolated precision (the best precision at any recall >= r; 0 past the
            highest recall reached), COCO's envelope.
        confidence_grid: [K] score thresholds 0..1; a detection counts at threshold t when its score >= t.
        precision: [C, K] precision of the detections kept at each threshold (1 where none is kept: no
            false positives, the scikit-learn convention).
        recall: [C, K] recall at each threshold.
        f1: [C, K] harmonic mean of precision and recall (0 where both are 0).
        ap: [C] average precision at ``iou_threshold`` = mean of ``precision_at_recall`` over the grid.
        mean_precision_at_recall, mean_precision, mean_recall, mean_f1: means over classes with ground truth,
            [R] or [K] (zeros when no class has any).
        mean_ap: mean of ``ap`` over classes with ground truth (mAP at ``iou_threshold``).
        best_index: index into ``confidence_grid`` of the highest ``mean_f1`` (the lowest threshold on ties).
    """

    iou_threshold: float
    category_ids: list[int]
    category_names: list[str]
    num_ground_truth: np.ndarray
    has_ground_truth: np.ndarray
    recall_grid: np.ndarray
    precision_at_recall: np.ndarray
    confidence_grid: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    ap: np.ndarray
    mean_precision_at_recall: np.ndarray
    mean_precision: np.ndarray
    mean_recall: np.ndarray
    mean_f1: np.ndarray
    mean_ap: float
    best_index: int

    @property
    def best_threshold(self) -> float:
        """Confidence threshold that maximises the mean F1 over classes."""
        return float(self.confidence_grid[self.best_index])

    @property
    def best_f1(self) -> float:
        """Mean F1 over classes at :attr:`best_threshold`."""
        return float(self.mean_f1[self.best_index])

    def describe(self) -> str:
        """One log line: ``best F1 0.612 at confidence 0.41 (precision 0.700, recall 0.544; AP@0.5 ...)``."""
        index = self.best_index
        return (
            f"best F1 {self.best_f1:.3f} at confidence {self.best_threshold:.2f} "
            f"(precision {self.mean_precision[index]:.3f}, recall {self.mean_recall[index]:.3f}; "
            f"AP@{self.iou_threshold:g} {self.mean_ap:.3f} over {int(self.has_ground_truth.sum())} classes)"
        )


@dataclass(frozen=True)
class _Detections:
    """COCO results as columns: ``image_ids``, ``category_ids`` [D] int64, ``scores`` [D], ``boxes`` [D, 4]
    xywh px."""

    image_ids: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    @classmethod
    def from_results(cls, results: Sequence[Mapping[str, Any]]) -> _Detections:
        count = len(results)
        return cls(
            np.fromiter((int(r["image_id"]) for r in results), dtype=np.int64, count=count),
            np.fromiter((int(r["category_id"]) for r in results), dtype=np.int64, count=count),
            np.fromiter((float(r["score"]) for r in results), dtype=np.float64, count=count),
            np.array([r["bbox"] for r in results], dtype=np.float64).reshape(count, 4),
        )

    def select(self, keep: np.ndarray) -> _Detections:
        return _Detections(self.image_ids[keep], self.category_ids[keep], self.scores[keep], self.boxes[keep])


def detection_curves(
    coco_gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_threshold: float = 0.5,
    num_points: int = 101,
    image_ids: Collection[int] | None = None,
) -> DetectionCurves:
    """Match detections to ground truth at one IoU threshold and build PR and confidence curves.

    Matching is COCOeval's: per image and category, detections in descending score order each take the
    unmatched non-crowd ground-truth box of highest IoU >= ``iou_threshold`` (a true positive); failing that,
    a detection covered by a crowd box (intersection / detection area >= the threshold) is ignored, neither
    true nor false positive; anything else is a false positive. Crowd boxes are not positives. Unlike the
    COCO metrics, every detection counts: no cap per image and category (COCO keeps 100) and no area range
    (an inverted box, of negative area, is a false positive rather than ignored).

    Args:
        coco_gt: COCO ground truth ``{"images": [{"id"}], "annotations": [{"image_id", "category_id",
            "bbox": [x, y, w, h] px, "iscrowd"?}], "categories": [{"id", "name"}]}``, e.g. a dataset's
            ``to_coco_dict()``. It is not modified.
        results: COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h] px, "score"}]``, e.g.
            ``CocoEvaluator.to_coco_results()``.
        iou_threshold: IoU needed for a match, in (0, 1].
        num_points: points of the recall and confidence grids (101 gives COCO's recall grid 0, 0.01, ..., 1).
        image_ids: evaluate only these images (e.g. ``CocoEvaluator.image_ids`` when validation ran on a
            subset); None for every image of ``coco_gt``. Detections on other images are dropped.

    Returns:
        The curves, see :class:`DetectionCurves`.

    Raises:
        ValueError: a bad threshold or grid size, or results naming images or categories ``coco_gt`` lacks.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}; COCO's AP50 uses 0.5")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}; 101 matches COCO's recall grid")
    categories = list(coco_gt.get("categories") or [])
    category_ids = [int(c["id"]) for c in categories]
    known_images = {int(image["id"]) for image in coco_gt.get("images") or []}
    selected = known_images if image_ids is None else {int(i) for i in image_ids}
    detections = _Detections.from_results(results)
    check_result_ids(detections.image_ids, detections.category_ids, known_images, category_ids)
    missing = sorted(selected - known_images)
    if missing:
        raise ValueError(f"image_ids {missing[:5]} are not in the ground truth's images")
    detections = detections.select(np.isin(detections.image_ids, sorted(selected)))
    ground_truth, crowd = _ground_truth(coco_gt, selected)

    recall_grid = np.linspace(0.0, 1.0, num_points)
    confidence_grid = np.linspace(0.0, 1.0, num_points)
    precision_at_recall, status = _match(ground_truth, crowd, detections, iou_threshold, recall_grid)
    positive_categories = np.array([a["category_id"] for a in ground_truth["annotations"]], dtype=np.int64)
    num_positives = np.array([int((positive_categories[~crowd] == c).sum()) for c in category_ids], np.int64)
    has_ground_truth = num_positives > 0
    counted = status != _IGNORED
    rows = [
        _confidence_curves(
            detections.scores[counted & (detections.category_ids == c)],
            status[counted & (detections.category_ids == c)] == _TRUE_POSITIVE,
            int(count),
            confidence_grid,
        )
        for c, count in zip(category_ids, num_positives, strict=True)
    ]
    precision, recall, f1 = (
        np.array([row[i] for row in rows]) if rows else np.zeros((0, num_points)) for i in range(3)
    )  # each [C, num_points]
    # COCO marks classes without ground truth -1; here their rows are zeros and left out of the means.
    precision_at_recall = np.where(has_ground_truth[:, None], precision_at_recall, 0.0)
    ap = precision_at_recall.mean(axis=1) if category_ids else np.zeros(0)
    mean_f1 = _mean_over(f1, has_ground_truth, num_points)
    return DetectionCurves(
        iou_threshold=float(iou_threshold),
        category_ids=category_ids,
        category_names=[str(c.get("name", c["id"])) for c in categories],
        num_ground_truth=num_positives,
        has_ground_truth=has_ground_truth,
        recall_grid=recall_grid,
        precision_at_recall=precision_at_recall,
        confidence_grid=confidence_grid,
        precision=precision,
        recall=recall,
        f1=f1,
        ap=ap,
        mean_precision_at_recall=_mean_over(precision_at_recall, has_ground_truth, num_points),
        mean_precision=_mean_over(precision, has_ground_truth, num_points),
        mean_recall=_mean_over(recall, has_ground_truth, num_points),
        mean_f1=mean_f1,
        mean_ap=float(ap[has_ground_truth].mean()) if has_ground_truth.any() else 0.0,
        best_index=int(np.argmax(mean_f1)),
    )


def _ground_truth(coco_gt: Mapping[str, Any], selected: set[int]) -> tuple[dict[str, Any], np.ndarray]:
    """A fresh COCO dict of the ``selected`` images (annotations numbered 1..N) and the [N] crowd flags.

    Fresh, because faster-coco-eval writes into the annotation dicts it is given.
    """
    annotations = []
    for annotation in coco_gt.get("annotations") or []:
        if int(annotation["image_id"]) in selected:
            x, y, w, h = (float(v) for v in annotation["bbox"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(annotation["image_id"]),
                    "category_id": int(annotation["category_id"]),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(bool(annotation.get("iscrowd", 0))),
                }
            )
    dataset = {
        "images": [{"id": image_id} for image_id in sorted(selected)],
        "annotations": annotations,
        "categories": [{"id": int(c["id"])} for c in coco_gt.get("categories") or []],
    }
    return dataset, np.array([bool(a["iscrowd"]) for a in annotations], dtype=bool)


def _match(
    ground_truth: dict[str, Any],
    crowd: np.ndarray,
    detections: _Detections,
    iou_threshold: float,
    recall_grid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval at one IoU threshold: ``(precision_at_recall [C, R] in category-list order, status [D])``.

    Precision rows of classes without ground truth are -1 (COCO's mark); statuses are true positive, ignored
    (covered by a crowd box) or false positive.
    """
    order = {c["id"]: row for row, c in enumerate(ground_truth["categories"])}
    precision_at_recall = np.zeros((len(order), len(recall_grid)))
    status = np.full(len(detections.scores), _FALSE_POSITIVE, dtype=np.int8)
    if not len(status) or not order:
        return precision_at_recall, status
    groups = np.stack((detections.image_ids, detections.category_ids))  # [2, D]
    largest_group = int(np.unique(groups, axis=1, return_counts=True)[1].max())
    columns = (detections.image_ids, detections.category_ids, detections.boxes, detections.scores)
    # What loadRes would make of the results (without the polygon it adds to each), numbered 1..D in order.
    rows = zip(*(column.tolist() for column in columns), strict=True)
    results = [
        {"id": number, "image_id": i, "category_id": c, "bbox": box, "score": s, "area": box[2] * box[3]}
        for number, (i, c, box, s) in enumerate(rows, start=1)
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # faster-coco-eval prints progress in places
        coco_gt = COCO(ground_truth)
        coco_dt = COCO({**ground_truth, "annotations": results})
        evaluation = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=logger.debug)
        params = evaluation.params
        params.imgIds = [image["id"] for image in ground_truth["images"]]
        params.iouThrs = np.array([iou_threshold], dtype=np.float64)
        params.recThrs = recall_grid
        # Every detection counts: one unbounded area range, and room for all detections of a group.
        params.areaRng, params.areaRngLbl = [[-np.inf, np.inf]], ["all"]
        params.maxDets = [largest_group]
        evaluation.evaluate()
        evaluation.accumulate()
    coco_rows = np.asarray(evaluation.eval["precision"])[0, :, :, 0, 0].T  # [C sorted by id, R]
    for coco_row, category_id in enumerate(params.catIds):
        precision_at_recall[order[category_id]] = coco_rows[coco_row]
    for key in evaluation.eval["matched"]:  # "detection id_ground-truth id", both counted from 1
        detection, truth = (int(part) - 1 for part in key.split("_"))
        status[detection] = _IGNORED if crowd[truth] else _TRUE_POSITIVE
    return precision_at_recall, status


def _confidence_curves(
    scores: np.ndarray, true_positive: np.ndarray, num_positives: int, confidence_grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's ``(precision [K], recall [K], f1 [K])`` from its counted detections' [D] scores and
    [D] bool true-positive flags."""
    zeros = np.zeros(len(confidence_grid))
    if num_positives == 0:
        return zeros, zeros, zeros
    if not len(scores):
        return np.ones(len(confidence_grid)), zeros, zeros
    order = np.argsort(-scores, kind="stable")
    score, cumulative_tp = scores[order], np.cumsum(true_positive[order])  # [D]
    # Detections with score >= t: scores are descending, so they are a prefix of length kept_count.
    kept_count = np.searchsorted(-score, -confidence_grid, side="right")  # [K]
    tp_at = np.concatenate([[0], cumulative_tp])[kept_count]  # [K]
    precision = np.divide(tp_at, kept_count, out=np.ones(len(confidence_grid)), where=kept_count > 0)
    recall = tp_at / num_positives
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(len(confidence_grid)), where=total > 0)
    return precision, recall, f1


def _mean_over(values: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """Mean of ``values[rows]`` over rows ([C, W] -> [W]); zeros when no row is selected."""
    return values[rows].mean(axis=0) if rows.any() else np.zeros(width)
