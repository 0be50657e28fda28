"""COCO-format detection datasets: COCO 2017, Objects365 (the original's JSON names), any custom COCO JSON."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from dfine.data.base import AnnotationTable, DetectionDataset
from dfine.data.label_map import LabelMap
from dfine.registry import DATASETS, ConfigError

__all__ = ["CocoDetection", "parse_coco"]

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
        ConfigError: missing file, malformed JSON, ``num_classes`` too small, or ``return_masks: True``.
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
    data = _read_json(ann_file)
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
    position = {int(image["id"]): index for index, image in enumerate(images)}
    rows: list[list[tuple[float, float, float, float, int, bool, float, int]]] = [[] for _ in images]
    orphans = 0
    for number, annotation in enumerate(annotations):
        index = position.get(int(annotation.get("image_id", -1)))
        if index is None:
            orphans += 1
            continue
        x, y, w, h = _bbox(annotation.get("bbox"))
        area = annotation.get("area")
        rows[index].append(
            (
                x,
                y,
                w,
                h,
                int(annotation.get("category_id", -1)),
                bool(annotation.get("iscrowd", 0)),
                float(area) if area is not None else w * h,
                int(annotation.get("id", number)),
            )
        )
    if orphans:
        logger.warning(
            "%s: %d annotations refer to image ids that are not in 'images'; skipped.", ann_file, orphans
        )
    table = AnnotationTable.from_lists(
        [
            (int(i["id"]), str(i["file_name"]), int(i.get("width", -1)), int(i.get("height", -1)))
            for i in images
        ],
        rows,
    )
    return table, label_map, orphans


def _bbox(value: Any) -> tuple[float, float, float, float]:
    """``[x, y, w, h]``; a malformed entry becomes a zero-size box (the check reports it)."""
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        return 0.0, 0.0, 0.0, 0.0
    return x, y, w, h


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"annotation file not found: {path} (check ann_file in the dataset block).")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error}).") from error
