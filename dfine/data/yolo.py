"""YOLO txt datasets read directly: ``images/<split>/*.jpg``, ``labels/<split>/*.txt`` and a names list."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from dfine.config.registry import DATASETS, ConfigError
from dfine.data.annotation_cache import cache_key, cached_table
from dfine.data.base import AnnotationTable, DetectionDataset
from dfine.data.image_io import try_read_image_size
from dfine.data.label_map import LabelMap

__all__ = ["IMAGE_SUFFIXES", "YoloDetection", "read_names"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@DATASETS.register()
class YoloDetection(DetectionDataset):
    """A dataset in the YOLO txt layout.

    Each image ``images/.../name.jpg`` has an optional ``labels/.../name.txt`` with one object per line:
    ``class cx cy w h`` normalised to 0..1 of the upright image (a polygon ``class x1 y1 x2 y2 ...`` also
    works: its bounding box is used). A missing label file means an image without objects. The class index is
    the category id; image ids are the positions in the sorted file list.

    Args:
        img_folder: folder of images (searched recursively).
        names: class names: a list, or a path to a ``data.yaml`` (its ``names``, list or ``{index: name}``) or
            to a text file with one name per line.
        label_folder: folder of ``.txt`` files mirroring ``img_folder``; default: ``img_folder`` with its last
            ``images`` path component replaced by ``labels`` (the YOLO convention).
        transforms: a `Compose` or its config block.
        num_classes: the config's ``num_classes`` (passed by the builder, checked against ``names``).
        max_failed_fraction: during training, a sample whose image fails to load is replaced by the next
            loadable one (counted, the file named once); more failures in one epoch than this fraction of the
            dataset stop the run with `TooManyFailedSamplesError`.
    """

    def __init__(
        self,
        img_folder: str,
        names: Sequence[str] | str,
        label_folder: str | None = None,
        transforms: Callable[..., Any] | Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        max_failed_fraction: float = 0.01,
    ) -> None:
        image_root = Path(img_folder).expanduser()
        if not image_root.is_dir():
            raise ConfigError(f"img_folder {image_root} is not a folder.")
        self.label_folder = (
            Path(label_folder).expanduser() if label_folder else _default_label_folder(image_root)
        )
        class_names = read_names(names)
        files = sorted(
            p.relative_to(image_root) for p in image_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ConfigError(f"img_folder {image_root} has no images ({', '.join(IMAGE_SUFFIXES)}).")
        label_files = [(self.label_folder / relative).with_suffix(".txt") for relative in files]
        key = cache_key([*(image_root / f for f in files), *label_files], "yolo")
        table, _ = cached_table(self.label_folder, key, lambda: _scan(image_root, files, label_files))
        label_map = LabelMap.from_names(
            class_names, source=str(names) if isinstance(names, str) else str(image_root)
        )
        self._setup(
            table, label_map, image_root, str(image_root), transforms, num_classes, max_failed_fraction
        )


def _scan(
    image_root: Path, files: list[Path], label_files: list[Path]
) -> tuple[AnnotationTable, dict[str, Any]]:
    """Read every label file and image size (the slow part the annotation cache keeps)."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # normalised coordinates refer to the upright size
        sizes = list(pool.map(try_read_image_size, [image_root / f for f in files], chunksize=64))
    images, rows = [], []
    next_annotation_id = 0
    for index, (relative, size, label_file) in enumerate(zip(files, sizes, label_files, strict=True)):
        objects = _read_label_file(label_file)
        width, height = size if size is not None else (0, 0)
        per_image = []
        for class_id, cx, cy, w, h in objects:
            box = ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)
            per_image.append((*box, class_id, False, box[2] * box[3], next_annotation_id))
            next_annotation_id += 1
        images.append((index, str(relative), *(size if size is not None else (-1, -1))))
        rows.append(per_image)
    return AnnotationTable.from_lists(images, rows), {}


def read_names(names: Sequence[str] | str | os.PathLike) -> list[str]:
    """Class names from a list, a YOLO ``data.yaml`` (``names`` list or dict) or a one-name-per-line file."""
    if not isinstance(names, (str, os.PathLike)):
        return [str(name) for name in names]
    path = Path(names).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"names: {path} is not a file; give a list of class names or a data.yaml / names.txt."
        )
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        listed = data.get("names") if isinstance(data, dict) else None
        if isinstance(listed, dict):
            return [str(listed[key]) for key in sorted(listed, key=int)]
        if isinstance(listed, list):
            return [str(name) for name in listed]
        raise ConfigError(f"{path}: no 'names' list or mapping.")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _default_label_folder(image_root: Path) -> Path:
    parts = list(image_root.resolve().parts)
    for position in range(len(parts) - 1, -1, -1):
        if parts[position] == "images":
            parts[position] = "labels"
            return Path(*parts)
    raise ConfigError(
        f"img_folder {image_root} has no 'images' component to derive the label folder from; "
        "set label_folder."
    )


def _read_label_file(path: Path) -> list[tuple[int, float, float, float, float]]:
    """``(class, cx, cy, w, h)`` rows (normalised); a malformed box becomes zero-size (reported)."""
    if not path.is_file():
        return []
    objects = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            class_id = int(float(fields[0]))
            values = [float(v) for v in fields[1:]]
        except ValueError:
            logger.warning("%s:%d: cannot parse %r; the line is ignored.", path, number, line)
            continue
        if len(values) == 4:
            objects.append((class_id, *values))
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            left, right, top, bottom = min(xs), max(xs), min(ys), max(ys)
            objects.append((class_id, (left + right) / 2, (top + bottom) / 2, right - left, bottom - top))
        else:
            objects.append((class_id, 0.0, 0.0, 0.0, 0.0))
    return objects
