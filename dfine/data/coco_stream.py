"""Parse a COCO JSON of any size into an `AnnotationTable` with memory bounded by the table, not the file.

``json.load`` of a COCO file holds every annotation as a Python dict: about 5x the file in RAM, ~20 GB for
Objects365. Here the file is streamed three times with ijson's C backend (yajl2_c), once per top-level
list (``images``, ``categories``, ``annotations``: their order in the file is free), and each annotation's
numbers go straight into typed arrays. Measured on a synthetic COCO-train-size file (118k images, 864k
boxes): ijson 1.8 s / 15 MB peak to iterate the annotations, ``json.load`` 2.7 s / 670 MB, msgspec typed
1.1 s / 450 MB (fast, but its memory grows with the file); see ``tools/benchmark_scale.py``.

Bad input is refused with the file and the entry named (duplicate or non-integer image ids, annotations
lacking ``image_id``/``category_id``, non-finite boxes) or counted in a named warning (boxes that are not 4
numbers, zero or negative width/height, unknown category ids, annotations of images not in the file, a file
without annotations). Warnings are kept in the cache's meta and repeated on every start.
"""

from __future__ import annotations

import json
import logging
import math
import os
from array import array
from typing import Any

import ijson
import numpy as np

from dfine.config.registry import ConfigError
from dfine.data.base import AnnotationTable
from dfine.data.label_map import LabelMap

__all__ = ["stream_coco"]

logger = logging.getLogger(__name__)

# Below this size an invalid file is re-read with the json module, whose message gives line and column.
_PRECISE_ERROR_BYTES = 64 << 20
_EXAMPLES = 3


def stream_coco(ann_file: str) -> tuple[AnnotationTable, dict[str, Any]]:
    """Parse ``ann_file`` (images sorted by id, annotations grouped per image in file order).

    Returns:
        table, and meta: ``categories`` (the file's list), ``orphans`` (annotations skipped), ``warnings``
        (messages to log on every use).

    Raises:
        ConfigError: invalid JSON, not a COCO detection file, or an entry that cannot be read (named).
    """
    try:
        images = _read_images(ann_file)
        categories = list(_items(ann_file, "categories.item"))
        columns = _read_annotations(ann_file)
    except (ijson.JSONError, ijson.IncompleteJSONError) as error:
        raise _invalid_json(ann_file, error) from None
    warnings: list[str] = []
    image_ids, file_names, sizes = images
    if not len(image_ids) and not _has_list(ann_file, "images"):
        raise ConfigError(f"{ann_file}: not a COCO detection file (no 'images' list).")
    owner, category_ids, boxes, areas, iscrowd, annotation_ids, malformed = columns
    if len(owner) and not categories:
        raise ConfigError(
            f"{ann_file}: has annotations but no 'categories' list; add one ({{id, name}} per class)."
        )
    label_map = LabelMap(categories, source=ann_file)

    order = np.argsort(image_ids, kind="stable")
    image_ids = image_ids[order]
    repeated = np.flatnonzero(np.diff(image_ids) == 0)
    if len(repeated):
        shown = ", ".join(str(int(i)) for i in np.unique(image_ids[repeated])[:_EXAMPLES])
        raise ConfigError(
            f"{ann_file}: image id {shown} appears more than once in 'images' ({len(repeated)} repeats); "
            "ids must be unique, or their boxes would be merged. Fix the converter that wrote the file."
        )
    if not len(owner):
        warnings.append(
            f"{ann_file}: has no annotations at all; every image is background. Training on it teaches the "
            "model to detect nothing: check that this is the file you meant."
        )
    position = np.searchsorted(image_ids, owner).clip(max=max(len(image_ids) - 1, 0))
    known = image_ids[position] == owner if len(image_ids) else np.zeros(len(owner), dtype=bool)
    orphans = int((~known).sum())
    if orphans:
        warnings.append(
            f"{ann_file}: {orphans} annotations refer to image ids that are not in 'images' (e.g. annotation "
            f"{_examples(annotation_ids, ~known)}); skipped."
        )
    malformed_rows, examples = malformed
    if len(malformed_rows):
        warnings.append(
            f"{ann_file}: {len(malformed_rows)} annotations have a bbox that is not 4 numbers (e.g. "
            f"{'; '.join(examples)}); not trained on (--check-data lists them as degenerate)."
        )
    degenerate = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    degenerate[malformed_rows] = False  # reported above
    if degenerate.any():
        warnings.append(
            f"{ann_file}: {int(degenerate.sum())} boxes have zero or negative width/height (e.g. annotation "
            f"{_examples(annotation_ids, degenerate)}); not trained on."
        )
    unknown = (label_map.labels_for(category_ids) < 0) & known
    if unknown.any():
        warnings.append(
            f"{ann_file}: {int(unknown.sum())} annotations have a category_id not in 'categories' (e.g. "
            f"category {_examples(category_ids, unknown)}); not trained on."
        )
    rows = np.flatnonzero(known)[np.argsort(position[known], kind="stable")]  # grouped by image, file order
    areas = np.where(np.isnan(areas), boxes[:, 2] * boxes[:, 3], areas)
    table = AnnotationTable(
        image_ids=image_ids,
        file_names=np.array(file_names, dtype=np.bytes_)[order] if file_names else np.zeros(0, "S1"),
        declared_sizes=sizes[order],
        offsets=np.concatenate(
            [[0], np.cumsum(np.bincount(position[known], minlength=len(image_ids)))]
        ).astype(np.int64),
        boxes_xywh=boxes[rows],
        category_ids=category_ids[rows],
        iscrowd=iscrowd[rows],
        areas=areas[rows].astype(np.float32),
        annotation_ids=annotation_ids[rows],
    )
    return table, {"categories": categories, "orphans": orphans, "warnings": warnings}


def _items(ann_file: str, prefix: str) -> Any:
    with open(ann_file, "rb") as file:
        yield from ijson.items(file, prefix, use_float=True)


def _has_list(ann_file: str, key: str) -> bool:
    with open(ann_file, "rb") as file:
        for prefix, event, _ in ijson.parse(file):
            if prefix == key and event == "start_array":
                return True
            if prefix == "" and event == "end_map":
                return False
    return False


def _read_images(ann_file: str) -> tuple[np.ndarray, list[bytes], np.ndarray]:
    ids, sizes, names = array("q"), array("q"), []
    for index, image in enumerate(_items(ann_file, "images.item")):
        where = f"images[{index}]"
        if not isinstance(image, dict):
            raise ConfigError(f"{ann_file}: {where} is not an object.")
        image_id = image.get("id")
        if type(image_id) is not int:  # bool is an int subclass, and 3.0 or "3" would silently change keys
            raise ConfigError(
                f"{ann_file}: {where}.id is {image_id!r}; image ids must be integers (COCO format)."
            )
        if "file_name" not in image:
            raise ConfigError(f"{ann_file}: {where} (id {image_id}) has no 'file_name'.")
        ids.append(image_id)
        names.append(str(image["file_name"]).encode())
        sizes.append(_int_or(image.get("width"), -1))
        sizes.append(_int_or(image.get("height"), -1))
    return np.frombuffer(ids, np.int64).copy(), names, np.frombuffer(sizes, np.int64).reshape(-1, 2).copy()


def _read_annotations(ann_file: str) -> tuple[Any, ...]:
    """Typed columns of all annotations (8-byte ints, 4-byte floats: about 45 bytes per box while reading)."""
    owner, categories, ids = array("q"), array("q"), array("q")
    boxes, areas, crowd = array("f"), array("d"), array("b")
    malformed, examples = array("q"), []
    for index, annotation in enumerate(_items(ann_file, "annotations.item")):
        try:
            owner.append(annotation["image_id"])
            categories.append(annotation["category_id"])
            ids.append(annotation.get("id", index))
        except KeyError as error:
            raise ConfigError(
                f"{ann_file}: annotations[{index}] has no {error.args[0]!r}; every annotation needs "
                "image_id, category_id and bbox."
            ) from None
        except (TypeError, OverflowError):
            raise ConfigError(
                f"{ann_file}: annotations[{index}] (id {annotation.get('id')!r}): image_id, category_id and "
                f"id must be integers; got {annotation.get('image_id')!r}, "
                f"{annotation.get('category_id')!r}, {annotation.get('id')!r}."
            ) from None
        bbox = annotation.get("bbox")
        try:
            x, y, w, h = bbox
            boxes.extend((x, y, w, h))
        except (TypeError, ValueError):
            if len(boxes) % 4:  # a non-number stopped extend midway
                del boxes[len(boxes) - len(boxes) % 4 :]
            malformed.append(index)
            if len(malformed) <= _EXAMPLES:
                examples.append(f"annotation {annotation.get('id', index)}: bbox {bbox!r}")
            boxes.extend((0.0, 0.0, 0.0, 0.0))
        area = annotation.get("area")
        areas.append(area if isinstance(area, (int, float)) else math.nan)
        crowd.append(1 if annotation.get("iscrowd") else 0)
    box_array = np.frombuffer(boxes, np.float32).reshape(-1, 4)
    infinite = np.flatnonzero(~np.isfinite(box_array).all(axis=1))
    if len(infinite):
        raise ConfigError(
            f"{ann_file}: annotations[{infinite[0]}] has bbox {box_array[infinite[0]].tolist()} "
            f"({len(infinite)} such boxes); coordinates must be finite numbers."
        )
    return (
        np.frombuffer(owner, np.int64),
        np.frombuffer(categories, np.int64),
        box_array,
        np.frombuffer(areas, np.float64),
        np.frombuffer(crowd, np.int8).astype(bool),
        np.frombuffer(ids, np.int64),
        (np.frombuffer(malformed, np.int64), examples),
    )


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _examples(values: np.ndarray, mask: np.ndarray) -> str:
    return ", ".join(str(int(v)) for v in values[np.flatnonzero(mask)[:_EXAMPLES]])


def _invalid_json(ann_file: str, error: Exception) -> ConfigError:
    if os.path.getsize(ann_file) <= _PRECISE_ERROR_BYTES:
        try:
            with open(ann_file, encoding="utf-8") as file:
                json.load(file, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as precise:
            return ConfigError(f"{ann_file}: not valid JSON ({precise}).")
        except _NonFinite as constant:
            return ConfigError(
                f"{ann_file}: contains {constant.args[0]}, which is not JSON (Python's json.dump writes it "
                "for a non-finite float); fix or drop the boxes that produced it."
            )
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ConfigError(
        f"{ann_file}: not valid JSON ({first_line}; NaN and Infinity, which Python's json.dump writes for "
        "non-finite floats, are not JSON either)."
    )


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)
