"""Precision-recall and F1-vs-confidence curves of a detector on a COCO-format validation set (numpy only).

Detections are matched to ground truth the way COCOeval does at one IoU threshold, so the per-class AP here
equals COCOeval's AP50 (same 101-point recall grid, same interpolated precision envelope), while the
confidence curves tell which score threshold to deploy with. :mod:`dfine.engine.plots` draws them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DetectionCurves", "detection_curves"]

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


def detection_curves(
    coco_gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_threshold: float = 0.5,
    num_points: int = 101,
    image_ids: Collection[int] | None = None,
) -> DetectionCurves:
    """Match detections to ground truth at one IoU threshold and build PR and confidence curves.

    Matching follows COCOeval: per image and category, detections in descending score order (stable on
    ties) each take the unmatched non-crowd ground-truth box of highest IoU >= ``iou_threshold`` (a true
    positive); failing that, a detection covered by a crowd box (intersection / detection area >= the
    threshold) is ignored, neither true nor false positive; anything else is a false positive. Crowd boxes
    are not positives. Unlike COCOeval, there is no cap on detections per image (COCO keeps 100 per image
    and category).

    Args:
        coco_gt: COCO ground truth ``{"images": [{"id"}], "annotations": [{"image_id", "category_id",
            "bbox": [x, y, w, h] px, "iscrowd"?}], "categories": [{"id", "name"}]}``, e.g. a dataset's
            ``to_coco_dict()``.
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
    image_column, category_column, score_column, box_column = _results_to_arrays(results)
    _check_ids(image_column, category_column, known_images, set(category_ids), selected)

    ground_truth = _group_ground_truth(coco_gt.get("annotations") or [], selected)
    detections = _group_detections(image_column, category_column, score_column, box_column, selected)
    scores, statuses, num_positives = _match_all(ground_truth, detections, category_ids, iou_threshold)

    recall_grid = np.linspace(0.0, 1.0, num_points)
    confidence_grid = np.linspace(0.0, 1.0, num_points)
    rows = [
        _class_curves(scores[c], statuses[c], num_positives[c], recall_grid, confidence_grid)
        for c in category_ids
    ]
    num_classes = len(category_ids)
    precision_at_recall, precision, recall, f1 = (
        np.array([row[i] for row in rows]) if rows else np.zeros((0, num_points)) for i in range(4)
    )  # each [C, num_points]
    ap = precision_at_recall.mean(axis=1) if num_classes else np.zeros(0)
    has_ground_truth = np.array([num_positives[c] > 0 for c in category_ids], dtype=bool)
    mean_f1 = _mean_over(f1, has_ground_truth, num_points)
    return DetectionCurves(
        iou_threshold=float(iou_threshold),
        category_ids=category_ids,
        category_names=[str(c.get("name", c["id"])) for c in categories],
        num_ground_truth=np.array([num_positives[c] for c in category_ids], dtype=np.int64),
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


def _match_all(
    ground_truth: Mapping[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    detections: Mapping[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    category_ids: list[int],
    iou_threshold: float,
) -> tuple[dict[int, list[np.ndarray]], dict[int, list[np.ndarray]], dict[int, int]]:
    """Per category: score arrays and match-status arrays (one per image), and the number of positives."""
    scores: dict[int, list[np.ndarray]] = {c: [] for c in category_ids}
    statuses: dict[int, list[np.ndarray]] = {c: [] for c in category_ids}
    num_positives = dict.fromkeys(category_ids, 0)
    for (_, category_id), (_, crowd) in ground_truth.items():
        if category_id in num_positives:  # annotations of categories missing from the list do not count
            num_positives[category_id] += int((~crowd).sum())
    no_boxes = (np.zeros((0, 4)), np.zeros(0, dtype=bool))
    for key in sorted(detections):  # image order, then per-image score order: COCOeval's tie order
        detection_boxes, detection_scores = detections[key]
        gt_boxes, crowd = ground_truth.get(key, no_boxes)
        statuses[key[1]].append(_match(detection_boxes, gt_boxes, crowd, iou_threshold))
        scores[key[1]].append(detection_scores)
    return scores, statuses, num_positives


def _results_to_arrays(
    results: Sequence[Mapping[str, Any]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(image_id [D] int, category_id [D] int, score [D] float, bbox [D, 4] xywh px)`` of COCO results."""
    count = len(results)
    return (
        np.fromiter((int(r["image_id"]) for r in results), dtype=np.int64, count=count),
        np.fromiter((int(r["category_id"]) for r in results), dtype=np.int64, count=count),
        np.fromiter((float(r["score"]) for r in results), dtype=np.float64, count=count),
        np.array([r["bbox"] for r in results], dtype=np.float64).reshape(count, 4),
    )


def _check_ids(
    image_ids: np.ndarray,
    category_ids: np.ndarray,
    known_images: set[int],
    known_categories: set[int],
    selected: set[int],
) -> None:
    unknown_images = sorted(set(np.unique(image_ids).tolist()) - known_images)
    if unknown_images:
        raise ValueError(
            f"{len(unknown_images)} result image ids are not in the ground truth, e.g. {unknown_images[:5]}: "
            "results and annotations come from different datasets or splits"
        )
    unknown_categories = sorted(set(np.unique(category_ids).tolist()) - known_categories)
    if unknown_categories:
        raise ValueError(
            f"result category ids {unknown_categories[:10]} are not in the ground truth's categories "
            f"{sorted(known_categories)[:10]}: map contiguous labels to the dataset's category ids first"
        )
    missing = sorted(selected - known_images)
    if missing:
        raise ValueError(f"image_ids {missing[:5]} are not in the ground truth's images")


def _group_ground_truth(
    annotations: Sequence[Mapping[str, Any]], selected: set[int]
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """``{(image_id, category_id): ([N, 4] xywh px boxes, [N] bool crowd)}``, non-crowd boxes first."""
    grouped: dict[tuple[int, int], list[tuple[list[float], bool]]] = {}
    for annotation in annotations:
        image_id = int(annotation["image_id"])
        if image_id in selected:
            key = (image_id, int(annotation["category_id"]))
            box = [float(v) for v in annotation["bbox"]]
            grouped.setdefault(key, []).append((box, bool(annotation.get("iscrowd", 0))))
    out = {}
    for key, rows in grouped.items():
        rows.sort(key=lambda row: row[1])  # stable: crowd boxes last, as COCOeval orders them
        boxes = np.array([box for box, _ in rows], dtype=np.float64)
        out[key] = (boxes, np.array([is_crowd for _, is_crowd in rows], dtype=bool))
    return out


def _group_detections(
    image_ids: np.ndarray, category_ids: np.ndarray, scores: np.ndarray, boxes: np.ndarray, selected: set[int]
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """``{(image_id, category_id): ([D, 4] xywh px boxes, [D] scores)}``, by descending score (stable)."""
    keep = np.isin(image_ids, np.fromiter(selected, dtype=np.int64, count=len(selected)))
    image_ids, category_ids, scores, boxes = image_ids[keep], category_ids[keep], scores[keep], boxes[keep]
    if not keep.any():
        return {}
    order = np.lexsort((-scores, category_ids, image_ids))  # stable, so equal scores keep the input order
    image_ids, category_ids, scores, boxes = (
        image_ids[order],
        category_ids[order],
        scores[order],
        boxes[order],
    )
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (image_ids[1:] != image_ids[:-1]) | (category_ids[1:] != category_ids[:-1])
    starts = np.flatnonzero(new_group).tolist()
    return {
        (int(image_ids[start]), int(category_ids[start])): (boxes[start:end], scores[start:end])
        for start, end in zip(starts, [*starts[1:], len(order)], strict=True)
    }


def _overlaps(detections: np.ndarray, ground_truth: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """[D, G] IoU of xywh boxes; for crowd columns intersection / detection area (COCO's crowd rule)."""
    d = detections[:, None, :]
    g = ground_truth[None, :, :]
    width = np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2]) - np.maximum(d[..., 0], g[..., 0])
    height = np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3]) - np.maximum(d[..., 1], g[..., 1])
    intersection = width.clip(min=0) * height.clip(min=0)
    area_detections = detections[:, 2].clip(min=0) * detections[:, 3].clip(min=0)
    area_ground_truth = ground_truth[:, 2].clip(min=0) * ground_truth[:, 3].clip(min=0)
    union = np.where(  # [D, G]
        crowd[None, :], area_detections[:, None], area_detections[:, None] + area_ground_truth - intersection
    )
    # Zero-area boxes (degenerate labels or predictions) overlap nothing rather than dividing by zero.
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _match(
    detections: np.ndarray, ground_truth: np.ndarray, crowd: np.ndarray, threshold: float
) -> np.ndarray:
    """Greedy COCO matching of score-sorted detections [D, 4] to ground truth [G, 4]; returns [D] statuses."""
    status = np.full(len(detections), _FALSE_POSITIVE, dtype=np.int8)
    if not len(ground_truth) or not len(detections):
        return status
    overlaps = _overlaps(detections, ground_truth, crowd)  # [D, G]
    # COCOeval caps the threshold just below 1 so that a perfect box still matches at IoU 1.
    threshold = min(threshold, 1 - 1e-10)
    if crowd.any():
        status[(overlaps[:, crowd] >= threshold).any(axis=1)] = _IGNORED  # unless a normal box takes it below
    normal = np.flatnonzero(~crowd)
    overlaps = overlaps[:, normal]  # [D, G'] non-crowd columns
    free = np.ones(len(normal), dtype=bool)
    # Only detections that reach the threshold with some box can be true positives; the greedy walk in score
    # order (which boxes are still free) is needed for those alone.
    for index in np.flatnonzero((overlaps >= threshold).any(axis=1)):
        candidates = np.where(free, overlaps[index], -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] >= threshold:
            status[index] = _TRUE_POSITIVE
            free[best] = False
    return status


def _class_curves(
    scores: list[np.ndarray],
    statuses: list[np.ndarray],
    num_positives: int,
    recall_grid: np.ndarray,
    confidence_grid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One class's ``(precision_at_recall [R], precision [K], recall [K], f1 [K])``."""
    zeros_recall, zeros_confidence = np.zeros(len(recall_grid)), np.zeros(len(confidence_grid))
    if num_positives == 0:
        return zeros_recall, zeros_confidence, zeros_confidence, zeros_confidence
    score = np.concatenate([*scores, np.zeros(0)])
    status = np.concatenate([*statuses, np.zeros(0, dtype=np.int8)])
    kept = status != _IGNORED
    order = np.argsort(-score[kept], kind="stable")  # across images; ties keep image order as COCOeval does
    score, true_positive = score[kept][order], status[kept][order] == _TRUE_POSITIVE
    if not len(score):
        return zeros_recall, np.ones(len(confidence_grid)), zeros_confidence, zeros_confidence
    cumulative_tp = np.cumsum(true_positive)  # [D]
    recall_curve = cumulative_tp / num_positives
    precision_curve = cumulative_tp / np.arange(1, len(score) + 1)

    # Envelope: precision at recall r is the best precision reached at any recall >= r (0 if never reached).
    envelope = np.maximum.accumulate(precision_curve[::-1])[::-1]
    positions = np.searchsorted(recall_curve, recall_grid, side="left")  # [R]
    reached = positions < len(score)
    precision_at_recall = np.where(reached, envelope[np.minimum(positions, len(score) - 1)], 0.0)

    # Detections with score >= t: scores are descending, so they are a prefix of length kept_count.
    kept_count = np.searchsorted(-score, -confidence_grid, side="right")  # [K]
    tp_at = np.concatenate([[0], cumulative_tp])[kept_count]  # [K]
    precision = np.divide(tp_at, kept_count, out=np.ones(len(confidence_grid)), where=kept_count > 0)
    recall = tp_at / num_positives
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(len(confidence_grid)), where=total > 0)
    return precision_at_recall, precision, recall, f1


def _mean_over(values: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """Mean of ``values[rows]`` over rows ([C, W] -> [W]); zeros when no row is selected."""
    return values[rows].mean(axis=0) if rows.any() else np.zeros(width)
