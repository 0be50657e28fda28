"""COCO box evaluation (faster-coco-eval) for training, ``dfine-eval`` and external result files alike.

Predictions are collected per image on every rank, gathered once (each image counted once, however often a
padded distributed sampler served it), scored on rank 0 and the metrics broadcast, so every rank takes the
same decisions (best checkpoint, stage switch) from them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

from dfine.config.build import build_block
from dfine.config.registry import EVALUATORS, ConfigError
from dfine.data.coco import read_json
from dfine.distributed import broadcast_object, gather_rows, is_main_process

__all__ = [
    "METRIC_NAMES",
    "CocoEvaluator",
    "build_evaluator",
    "check_result_ids",
    "load_coco_ground_truth",
    "score_results_file",
]

logger = logging.getLogger(__name__)

# Names of the first twelve COCOeval.stats entries, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_COLUMNS = 6  # per detection: x, y, w, h (pixels), score, category_id
_NO_ROWS = np.empty((0, _COLUMNS), np.float32)


def load_coco_ground_truth(source: COCO | str | Path | Mapping[str, Any] | Any) -> COCO:
    """Return a faster-coco-eval ``COCO`` from a ``COCO`` object (either library), a JSON path or a dict."""
    if isinstance(source, COCO):
        return source
    if isinstance(source, str | Path):
        return COCO(read_json(source))
    if isinstance(source, Mapping):
        return COCO(dict(source))
    if hasattr(source, "dataset") and isinstance(source.dataset, Mapping):  # pycocotools.coco.COCO
        return COCO(dict(source.dataset))
    raise TypeError(f"expected a COCO object, an annotation JSON path or dict, got {type(source).__name__}")


def _to_numpy(value: torch.Tensor | np.ndarray | list[Any], dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


@EVALUATORS.register()
class CocoEvaluator:
    """Collect detections, gather them over ranks and score them with COCO's box AP.

    The config's ``evaluator`` block (``{type: CocoEvaluator, iou_types: [bbox], max_detections: 100}``) is
    built by :func:`build_evaluator`, which hands over the validation set's ground truth.

    Args:
        coco_gt: the ground truth (see :func:`load_coco_ground_truth`); category ids are the dataset's own.
        iou_types: what is scored; D-FINE predicts boxes, so ``["bbox"]`` is the only choice (accepted for
            the original configs, which list it).
        max_detections: COCOeval's largest ``maxDets`` (100): per image and category, only the highest-scoring
            detections up to this count are scored. Pass all of the post-processor's detections (D-FINE: 300
            per image); do not cut them per image, that would change AP.

    Example:
        >>> evaluator = CocoEvaluator("annotations/instances_val2017.json")
        >>> evaluator.update({image_id: {"boxes": boxes_xyxy_px, "scores": scores, "labels": category_ids}})
        >>> metrics = evaluator.summarize()       # every rank calls it; {"AP": ..., "AP50": ..., ...}
    """

    def __init__(
        self,
        coco_gt: COCO | str | Path | Mapping[str, Any],
        iou_types: Sequence[str] = ("bbox",),
        max_detections: int = 100,
    ) -> None:
        if list(iou_types) != ["bbox"]:
            raise ConfigError(
                "evaluator.iou_types: D-FINE predicts boxes, so only [bbox] can be scored, "
                f"got {list(iou_types)}"
            )
        self.coco_gt = load_coco_ground_truth(coco_gt)
        self.max_detections = max_detections
        self.reset()

    def reset(self) -> None:
        """Forget all predictions and results (call before each evaluation)."""
        self._detections: dict[int, np.ndarray] = {}  # image_id -> [K, 6] float32
        self._synchronized = False
        self.metrics: dict[str, float] = {}
        self.per_class: list[dict[str, Any]] = []

    @property
    def image_ids(self) -> list[int]:
        """Images evaluated so far (those passed to :meth:`update`, with or without detections)."""
        return sorted(self._detections)

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor | np.ndarray]]) -> None:
        """Add post-processed detections of some images.

        Args:
            predictions: ``image_id -> {"boxes": [K, 4] xyxy in pixels of the original image,
                "scores": [K], "labels": [K] category ids of the annotation file}``; ``K`` may be 0. An image
                seen before keeps its first detections.
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id in self._detections:
                continue
            boxes = _to_numpy(prediction["boxes"], np.float32).reshape(-1, 4)  # [K, 4] xyxy px
            scores = _to_numpy(prediction["scores"], np.float32).reshape(-1)
            labels = _to_numpy(prediction["labels"], np.float32).reshape(-1)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(
                    f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels; "
                    "they must be equal"
                )
            rows = np.empty((len(boxes), _COLUMNS), dtype=np.float32)
            rows[:, 0:2] = boxes[:, 0:2]
            rows[:, 2:4] = boxes[:, 2:4] - boxes[:, 0:2]  # xyxy -> xywh
            rows[:, 4] = scores
            rows[:, 5] = labels
            self._detections[image_id] = _cap_per_category(rows, self.max_detections)
        self._synchronized = False

    def synchronize(self) -> None:
        """Gather every rank's detections onto rank 0, keeping one entry per image (first rank wins).

        Every rank must call it (a collective); a single process returns at once. Rows travel as tensors
        (`gather_rows`), not pickled objects, and only rank 0 receives them; the other ranks keep the
        gathered image ids only (for :attr:`image_ids`).
        """
        ids = np.fromiter(self._detections, np.int64, len(self._detections))
        counts = np.array([len(rows) for rows in self._detections.values()], dtype=np.int64)
        rows = np.concatenate([*self._detections.values(), np.empty((0, _COLUMNS), np.float32)])
        parts = [gather_rows(torch.from_numpy(array)) for array in (ids, counts, np.ascontiguousarray(rows))]
        merged: dict[int, np.ndarray] = {}
        if parts[0] is not None:
            for rank_ids, rank_counts, rank_rows in zip(*parts, strict=True):
                if not len(rank_ids):
                    continue
                split = np.split(rank_rows.numpy(), np.cumsum(rank_counts.numpy())[:-1])
                for image_id, image_rows in zip(rank_ids.tolist(), split, strict=True):
                    merged.setdefault(image_id, image_rows)
        seen = broadcast_object(sorted(merged) if is_main_process() else None)
        self._detections = merged if is_main_process() else dict.fromkeys(seen, _NO_ROWS)
        self._synchronized = True

    def to_coco_results(self) -> list[dict[str, Any]]:
        """Detections in COCO results format: ``[{"image_id", "category_id", "bbox": [x, y, w, h] px,
        "score"}]``, by image id (all ranks' on rank 0 after :meth:`synchronize`, none on the other ranks;
        this rank's before)."""
        return _coco_results(self._detections)

    def summarize(self) -> dict[str, float]:
        """Gather (if not done yet), score on rank 0 and share the metrics with every rank.

        Returns:
            ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}`` in
            0..1 (COCOeval's convention: -1 where a metric is undefined, e.g. no large objects).
            :attr:`per_class` then holds one row per category.
        """
        if not self._synchronized:
            self.synchronize()
        scored = None
        if is_main_process():
            scored = _score(self.coco_gt, self._detections, self.max_detections)
        self.metrics, self.per_class = broadcast_object(scored)
        return dict(self.metrics)

    def per_class_table(self) -> str:
        """Per-category AP / AP50 as an aligned text table (after :meth:`summarize`)."""
        if not self.per_class:
            return "no per-class results (call summarize first)"
        width = max(8, *(len(row["name"]) for row in self.per_class))
        lines = [f"{'category':<{width}}  {'id':>5}  {'AP':>6}  {'AP50':>6}"]
        for row in self.per_class:
            ap, ap50 = (f"{v:6.3f}" if v is not None else "   n/a" for v in (row["AP"], row["AP50"]))
            lines.append(f"{row['name']:<{width}}  {row['category_id']:>5}  {ap}  {ap50}")
        return "\n".join(lines)


def check_result_ids(
    image_ids: np.ndarray,
    category_ids: np.ndarray,
    known_image_ids: Collection[int],
    known_category_ids: Collection[int],
) -> None:
    """Check that detections name only images and categories of the ground truth.

    Args:
        image_ids: [D] image id of each detection.
        category_ids: [D] category id of each detection (the annotation file's ids, not contiguous labels).
        known_image_ids: the ground truth's image ids.
        known_category_ids: the ground truth's category ids.

    Raises:
        ValueError: naming the first unknown ids and the likely cause.
    """
    known_images = np.fromiter(known_image_ids, np.int64)
    unknown_images = np.setdiff1d(np.asarray(image_ids, dtype=np.int64), known_images)
    if unknown_images.size:
        example = unknown_images[:5].tolist()
        raise ValueError(
            f"{unknown_images.size} image ids are not in the annotation file, e.g. {example}: "
            "predictions and annotations come from different datasets or splits"
        )
    known_categories = np.unique(np.fromiter(known_category_ids, np.int64))
    unknown = np.setdiff1d(np.asarray(category_ids, dtype=np.int64), known_categories)
    if unknown.size:
        raise ValueError(
            f"predicted category ids {unknown[:10].tolist()} are not in the annotation file "
            f"(its ids: {known_categories[:10].tolist()}...). Labels must be mapped from contiguous "
            "indices to the dataset's category ids before evaluation (check the label map and num_classes)."
        )


def _cap_per_category(rows: np.ndarray, limit: int) -> np.ndarray:
    """Keep the ``limit`` highest-scoring rows of each category: COCOeval never looks further, so AP is
    unchanged while a 365-class model's long tail of detections stays out of the gather."""
    if len(rows) <= limit:
        return rows
    order = np.lexsort((-rows[:, 4], rows[:, 5]))  # by category, best score first
    categories = rows[order, 5]
    first = np.searchsorted(categories, categories, side="left")
    keep = order[np.arange(len(order)) - first < limit]
    return rows[np.sort(keep)]


def _coco_results(detections: Mapping[int, np.ndarray]) -> list[dict[str, Any]]:
    """``image_id -> [K, 6]`` rows (x, y, w, h px, score, category id) as COCO results, by image id."""
    results = []
    for image_id in sorted(detections):
        for x, y, w, h, score, category in detections[image_id].tolist():
            results.append(
                {"image_id": image_id, "category_id": int(category), "bbox": [x, y, w, h], "score": score}
            )
    return results


def _score(
    coco_gt: COCO, detections: Mapping[int, np.ndarray], max_detections: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO box evaluation of ``detections`` over exactly the images it holds."""
    rows = np.concatenate([*detections.values(), np.empty((0, _COLUMNS), np.float32)])  # [D, 6]
    image_ids = np.array(list(detections), dtype=np.int64)
    check_result_ids(image_ids, rows[:, 5], coco_gt.getImgIds(), coco_gt.getCatIds())
    results = _coco_results(detections)
    if not results or not detections:
        metrics = dict.fromkeys(METRIC_NAMES, 0.0)
        per_class = [
            {"category_id": c, "name": coco_gt.cats[c]["name"], "AP": 0.0, "AP50": 0.0}
            for c in coco_gt.getCatIds()
        ]
        return metrics, per_class
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluation = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=logger.debug)
        evaluation.params.imgIds = sorted(detections)
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    metrics = {name: float(value) for name, value in zip(METRIC_NAMES, evaluation.stats[:12], strict=True)}
    precision = np.asarray(evaluation.eval["precision"])  # [T iou, R recall, K classes, A areas, M max dets]
    per_class = []
    for index, category_id in enumerate(evaluation.params.catIds):
        row: dict[str, Any] = {"category_id": int(category_id), "name": coco_gt.cats[category_id]["name"]}
        for key, values in (("AP", precision[:, :, index, 0, -1]), ("AP50", precision[0, :, index, 0, -1])):
            valid = values[values > -1]
            row[key] = float(valid.mean()) if valid.size else None
        per_class.append(row)
    return metrics, per_class


def score_results_file(
    results: str | Path | list[dict[str, Any]], coco_gt: COCO | str | Path | Mapping[str, Any]
) -> CocoEvaluator:
    """Score a COCO results file (e.g. another detector's) with the same code as training evaluation.

    Every image of the annotation file counts, as in the standard COCO protocol (images without predictions
    lose recall).

    Args:
        results: path to a results JSON, or its list: ``[{"image_id", "category_id", "bbox": [x, y, w, h]
            pixels, "score"}]``.
        coco_gt: the annotations (path, dict or ``COCO``).

    Returns:
        The evaluator after :meth:`CocoEvaluator.summarize`: ``.metrics`` and ``.per_class`` are filled.
    """
    if isinstance(results, str | Path):
        results = read_json(results, "results file")
    if not isinstance(results, list):
        raise ValueError(f"a COCO results file holds a JSON list of detections, got {type(results).__name__}")
    evaluator = CocoEvaluator(coco_gt)
    grouped: dict[int, list[list[float]]] = {int(i): [] for i in evaluator.coco_gt.getImgIds()}
    for index, detection in enumerate(results):
        try:
            x, y, w, h = (float(v) for v in detection["bbox"])
            row = [x, y, w, h, float(detection["score"]), float(detection["category_id"])]
            grouped.setdefault(int(detection["image_id"]), []).append(row)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"results[{index}] = {detection!r} is not a COCO box result "
                "{image_id, category_id, bbox: [x, y, w, h], score}"
            ) from error
    evaluator._detections = {
        image_id: np.asarray(rows, dtype=np.float32).reshape(-1, _COLUMNS)
        for image_id, rows in grouped.items()
    }
    evaluator._synchronized = True
    evaluator.summarize()
    if math.isclose(evaluator.metrics["AP"], 0.0) and results:
        logger.warning("AP is 0: check that bbox is [x, y, width, height] in pixels and category ids match")
    return evaluator


def build_evaluator(
    block: Mapping[str, Any] | None, coco_gt: COCO | str | Path | Mapping[str, Any], where: str = "evaluator"
) -> CocoEvaluator:
    """Build the config's ``evaluator`` block for ``coco_gt``; ``None`` gives ``{type: CocoEvaluator}``.

    Raises:
        ConfigError: an unknown type or argument, or ``iou_types`` other than ``[bbox]``.
    """
    return build_block("evaluator", block or {"type": "CocoEvaluator"}, where, coco_gt=coco_gt)
