"""COCO-format detection datasets: COCO 2017, Objects365 (the original's JSON names), any custom COCO JSON."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dfine.config.registry import DATASETS, ConfigError
from dfine.data.base import AnnotationTable, DetectionDataset
from dfine.data.label_map import LabelMap

__all__ = ["CocoDetection", "parse_coco", "read_json"]

logger = logging.getLogger(__name__)


@DATASETS.register()
class CocoDetection(DetectionDataset):
    """Images in ``img_folder`` with boxes from a COCO ``instances_*.json``-style file.

    Category ids of any form (1..N, sparse like COCO's 1..90, from 0) map to labels 0..C-1 in ascending id
    order (`LabelMap`); ``iscrowd`` boxes are kept for evaluation but not trained on; images without
    annotations are kept (they teach the model what is not an object).

    Args:
        img_folder: folder the ``file_name`` entries are relative to.
        ann_file: COCO JSON with ``images``, ``annotations`` and ``categories``.
        transforms: a `Compose` (or its config block); None returns PIL images and xyxy pixel boxes.
        return_masks: kept so the original configs load; only False is supported (D-FINE detects boxes).
        num_classes: the config's top-level ``num_classes``, passed by the builder and checked against the
            file's categories.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist.
        ConfigError: malformed JSON, ``num_classes`` too small, or ``return_masks: True``.
    """

    def __init__(
        self,
        img_folder: str,
        ann_file: str,
        transforms: Callable[..., Any] | Mapping[str, Any] | None = None,
        return_masks: bool = False,
        num_classes: int | None = None,
    ) -> None:
        if return_masks:
            raise ConfigError(
                f"{ann_file}: return_masks: True is not supported (D-FINE predicts boxes only)."
            )
        self.ann_file = os.fspath(ann_file)
        table, label_map, self.orphan_annotations = parse_coco(self.ann_file)
        self._setup(table, label_map, img_folder, self.ann_file, transforms, num_classes)


def parse_coco(ann_file: str) -> tuple[AnnotationTable, LabelMap, int]:
    """Read a COCO JSON file into an `AnnotationTable` (images sorted by id) and its `LabelMap`.

    Returns:
        table, label_map, and the number of annotations whose ``image_id`` is not among the images (skipped).
    """
    data = read_json(ann_file, hint=" (check ann_file in the dataset block)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ConfigError(f"{ann_file}: not a COCO detection file (no 'images' list).")
    annotations = data.get("annotations") or []
    categories = data.get("categories") or []
    if annotations and not categories:
        raise ConfigError(
            f"{ann_file}: has annotations but no 'categories' list; add one ({{id, name}} per class)."
        )
    label_map = LabelMap(categories, source=ann_file)

    images = sorted(data["images"], key=lambda image: int(image["id"]))
    image_ids = np.array([int(image["id"]) for image in images], dtype=np.int64)
    # Vectorised: COCO train has ~860k annotations, Objects365 ~25M; a Python row per box takes minutes.
    owner = np.fromiter((int(a.get("image_id", -1)) for a in annotations), np.int64, len(annotations))
    position = np.searchsorted(image_ids, owner).clip(max=max(len(image_ids) - 1, 0))
    known = image_ids[position] == owner if len(image_ids) else np.zeros(len(owner), dtype=bool)
    orphans = int((~known).sum())
    if orphans:
        logger.warning(
            "%s: %d annotations refer to image ids that are not in 'images'; skipped.", ann_file, orphans
        )
    boxes = _boxes([a.get("bbox") for a in annotations])
    areas = np.fromiter((_number(a.get("area")) for a in annotations), np.float64, len(annotations))
    areas = np.where(np.isnan(areas), boxes[:, 2] * boxes[:, 3], areas)
    order = np.argsort(position[known], kind="stable")  # group rows by image, file order within an image
    rows = np.flatnonzero(known)[order]
    table = AnnotationTable(
        image_ids=image_ids,
        file_names=np.array([str(image["file_name"]).encode() for image in images], dtype=np.bytes_),
        declared_sizes=np.array(
            [(int(i.get("width", -1)), int(i.get("height", -1))) for i in images], dtype=np.int64
        ).reshape(-1, 2),
        offsets=np.concatenate([[0], np.cumsum(np.bincount(position[known], minlength=len(images)))]).astype(
            np.int64
        ),
        boxes_xywh=boxes[rows].astype(np.float32),
        category_ids=np.fromiter((int(a.get("category_id", -1)) for a in annotations), np.int64)[rows],
        iscrowd=np.fromiter((bool(a.get("iscrowd", 0)) for a in annotations), bool)[rows],
        areas=areas[rows].astype(np.float32),
        annotation_ids=np.fromiter((int(a.get("id", k)) for k, a in enumerate(annotations)), np.int64)[rows],
    )
    return table, label_map, orphans


def _boxes(values: list[Any]) -> np.ndarray:
    """[A, 4] ``x, y, w, h``; a malformed entry becomes a zero-size box (the check reports it)."""
    try:
        boxes = np.asarray(values, dtype=np.float64).reshape(len(values), 4)
    except (TypeError, ValueError):
        boxes = np.array([_bbox(value) for value in values], dtype=np.float64).reshape(-1, 4)
    return boxes


def _bbox(value: Any) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        return 0.0, 0.0, 0.0, 0.0
    return x, y, w, h


def _number(value: Any) -> float:
    return float(value) if value is not None else float("nan")


def read_json(path: str | os.PathLike, what: str = "annotation file", hint: str = "") -> Any:
    """The parsed content of a JSON file (annotations, COCO results), with errors that name the file.

    Args:
        path: the file.
        what: what the file is, for the not-found message (``"results file"``, ...).
        hint: appended to the not-found message, e.g. which config key gave the path.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ConfigError: the file is not valid JSON (the message gives the line and column).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)}{hint}")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{os.fspath(path)}: not valid JSON ({error}).") from error
