"""Pascal VOC XML datasets read directly (the original D-FINE's ``VOCDetection`` layout)."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dfine.config.registry import DATASETS, ConfigError
from dfine.data.annotation_cache import cache_key, cached_table
from dfine.data.base import AnnotationTable, DetectionDataset
from dfine.data.label_map import LabelMap

__all__ = ["VOCDetection", "parse_voc_xml"]

logger = logging.getLogger(__name__)


@DATASETS.register()
class VOCDetection(DetectionDataset):
    """Images and Pascal VOC XML files listed in ``root/ann_file``, classes in ``root/label_file``.

    ``ann_file`` has one ``image_path xml_path`` pair per line, both relative to ``root``; ``label_file`` one
    class name per line. The category id of a name is its line number from 0 (so labels equal ids), image ids
    are line numbers from 0. Boxes are taken as written (``xmin ymin xmax ymax`` pixels); objects whose name
    is not in the label file are reported by the dataset check and dropped.

    Args:
        root: dataset folder.
        ann_file: list of ``image xml`` pairs, relative to ``root``.
        label_file: class names, relative to ``root``.
        transforms: a `Compose` or its config block.
        num_classes: the config's ``num_classes`` (passed by the builder, checked against the label file).
        max_failed_fraction: during training, a sample whose image fails to load is replaced by the next
            loadable one (counted, the file named once); more failures in one epoch than this fraction of the
            dataset stop the run with `TooManyFailedSamplesError`.
    """

    def __init__(
        self,
        root: str,
        ann_file: str = "trainval.txt",
        label_file: str = "label_list.txt",
        transforms: Callable[..., Any] | Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        max_failed_fraction: float = 0.01,
    ) -> None:
        root_path = Path(root).expanduser()
        list_path, labels_path = root_path / ann_file, root_path / label_file
        for path in (list_path, labels_path):
            if not path.is_file():
                raise ConfigError(f"VOC dataset: {path} not found (root={root}).")
        names = [
            line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        label_map = LabelMap.from_names(names, source=str(labels_path))
        pairs = [line.split() for line in list_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for index, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ConfigError(
                    f"{list_path}:{index + 1}: expected 'image_path xml_path', got {' '.join(pair)!r}."
                )
        key = cache_key([list_path, labels_path, *(root_path / pair[1] for pair in pairs)], "voc")
        table, meta = cached_table(list_path, key, lambda: _scan(root_path, pairs, names))
        if meta["unknown"]:
            logger.warning(
                "%s: object names not in %s: %s (those boxes are dropped).",
                list_path,
                label_file,
                meta["unknown"],
            )
        self._setup(table, label_map, root_path, str(list_path), transforms, num_classes, max_failed_fraction)


def _scan(root: Path, pairs: list[list[str]], names: list[str]) -> tuple[AnnotationTable, dict[str, Any]]:
    """Read every XML file (the slow part the annotation cache keeps)."""
    category_of = {name: index for index, name in enumerate(names)}
    images, rows = [], []
    unknown: set[str] = set()
    next_annotation_id = 0
    for index, pair in enumerate(pairs):
        width, height, objects = parse_voc_xml(root / pair[1])
        per_image = []
        for name, (x1, y1, x2, y2) in objects:
            if name not in category_of:
                unknown.add(name)
            box = (x1, y1, x2 - x1, y2 - y1)
            per_image.append((*box, category_of.get(name, -1), False, box[2] * box[3], next_annotation_id))
            next_annotation_id += 1
        images.append((index, pair[0], width, height))
        rows.append(per_image)
    return AnnotationTable.from_lists(images, rows), {"unknown": sorted(unknown)}


def parse_voc_xml(path: Path) -> tuple[int, int, list[tuple[str, tuple[float, float, float, float]]]]:
    """Read one VOC annotation.

    Returns:
        width, height (-1 when the file has no ``size``) and ``(name, (xmin, ymin, xmax, ymax))`` per object.
    """
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise ConfigError(f"cannot read VOC annotation {path}: {error}") from error
    size = root.find("size")
    width = int(float(size.findtext("width", "-1"))) if size is not None else -1
    height = int(float(size.findtext("height", "-1"))) if size is not None else -1
    objects = []
    for element in root.iter("object"):
        box = element.find("bndbox")
        name = (element.findtext("name") or "").strip()
        if box is None:
            objects.append((name, (0.0, 0.0, 0.0, 0.0)))
            continue
        coordinates = tuple(float(box.findtext(key, "0")) for key in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name, coordinates))
    return width, height, objects
