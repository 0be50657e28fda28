"""COCO-format detection datasets: COCO 2017, Objects365 (the original's JSON names), any custom COCO JSON."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from dfine.config.registry import DATASETS, ConfigError
from dfine.data.annotation_cache import cache_key, cached_table
from dfine.data.base import AnnotationTable, DetectionDataset
from dfine.data.coco_stream import stream_coco
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
        max_failed_fraction: during training, a sample whose image fails to load is replaced by the next
            loadable one (counted, the file named once); more failures in one epoch than this fraction of the
            dataset stop the run with `TooManyFailedSamplesError`.

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
        max_failed_fraction: float = 0.01,
    ) -> None:
        if return_masks:
            raise ConfigError(
                f"{ann_file}: return_masks: True is not supported (D-FINE predicts boxes only)."
            )
        self.ann_file = os.fspath(ann_file)
        table, label_map, self.orphan_annotations = parse_coco(self.ann_file)
        self._setup(table, label_map, img_folder, self.ann_file, transforms, num_classes, max_failed_fraction)


def parse_coco(ann_file: str) -> tuple[AnnotationTable, LabelMap, int]:
    """The `AnnotationTable` (images sorted by id) and `LabelMap` of a COCO JSON file, through its cache.

    The first call streams the file (`stream_coco`, memory bounded by the table) and writes the binary cache
    (`dfine.data.annotation_cache`); later calls, in any process, memory-map it. Warnings about the file's
    content are logged on every call, cached or not.

    Returns:
        table, label_map, and the number of annotations whose ``image_id`` is not among the images (skipped).

    Raises:
        FileNotFoundError: ``ann_file`` does not exist.
        ConfigError: invalid JSON, not a COCO detection file, or an entry that cannot be read (named).
    """
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(
            f"annotation file not found: {os.fspath(ann_file)} (check ann_file in the dataset block)"
        )
    table, meta = cached_table(ann_file, cache_key([ann_file], "coco"), lambda: stream_coco(ann_file))
    for message in meta["warnings"]:
        logger.warning("%s", message)
    return table, LabelMap(meta["categories"], source=ann_file), int(meta["orphans"])


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
