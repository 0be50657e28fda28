"""The built-in quickstart dataset: simple coloured shapes on textured backgrounds, generated on first use.

Four classes (circle, square, triangle, star; COCO-style category ids 1..4) in solid saturated colours,
1..6 per 320 x 320 image, 20..160 pixels across, rotated at random (except the circle), never overlapping, so
every box is tight around one fully visible shape. Backgrounds are smooth muted colour fields with pixel
noise and a few faint lines, so the model has to look at shape, not at "anything coloured". A shape's colour
says nothing about its class.

Everything is a pure function of ``(seed, split, image index, image_size)``: the same arguments give
byte-identical files on every machine. A split is generated into a temporary folder and renamed into place, so
several ranks starting together neither race nor see a half-written set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dfine.config.registry import DATASETS
from dfine.data.coco import CocoDetection

__all__ = [
    "QUICKSTART_CLASSES",
    "QuickstartDetection",
    "default_cache_root",
    "ensure_quickstart",
    "generate_split",
]

logger = logging.getLogger(__name__)

QUICKSTART_CLASSES = ("circle", "square", "triangle", "star")
_FORMAT_VERSION = 1
_DEFAULT_NUM_IMAGES = {"train": 800, "val": 200}
_MIN_SIZE, _MAX_SIZE = 20, 160
_MAX_OBJECTS = 6


def default_cache_root() -> Path:
    """``$DFINE_CACHE/quickstart`` if ``DFINE_CACHE`` is set, else ``~/.cache/dfine/quickstart``."""
    base = os.environ.get("DFINE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dfine") / "quickstart"


def ensure_quickstart(
    root: str | os.PathLike | None = None,
    split: str = "train",
    num_images: int = 800,
    seed: int = 0,
    image_size: int = 320,
) -> Path:
    """Folder of the requested split (``images/`` + ``annotations.json``), generating it if absent.

    Returns:
        ``<root>/v1-seed<seed>-<size>px/<split><num_images>``.
    """
    base = Path(root).expanduser() if root is not None else default_cache_root()
    final = base / f"v{_FORMAT_VERSION}-seed{seed}-{image_size}px" / f"{split}{num_images}"
    if (final / "annotations.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        generate_split(scratch, split=split, num_images=num_images, seed=seed, image_size=image_size)
        try:
            os.rename(scratch, final)  # atomic; fails if another process got there first
            logger.info("quickstart: generated %d %s images in %s", num_images, split, final)
        except OSError:
            if not (final / "annotations.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def generate_split(
    out_dir: str | os.PathLike, split: str, num_images: int, seed: int = 0, image_size: int = 320
) -> Path:
    """Write ``num_images`` images to ``out_dir/images`` and ``out_dir/annotations.json``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index, image_size])
        picture, objects = _draw_image(rng, image_size)
        file_name = f"{index:06d}.jpg"
        picture.save(out / "images" / file_name, quality=92)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for class_index, (x1, y1, x2, y2) in objects:
            width, height = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "bbox": [x1, y1, width, height],
                    "area": width * height,
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(QUICKSTART_CLASSES)
    ]
    info = {"description": f"dfine quickstart shapes v{_FORMAT_VERSION}", "seed": seed, "split": split}
    document = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (out / "annotations.json").write_text(json.dumps(document), encoding="utf-8")
    return out


def _draw_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    picture = _background(rng, size)
    draw = ImageDraw.Draw(picture)
    placed: list[list[float]] = []
    objects = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        class_index = int(rng.integers(len(QUICKSTART_CLASSES)))
        extent = float(np.exp(rng.uniform(math.log(_MIN_SIZE), math.log(_MAX_SIZE))))
        colour = _object_colour(rng)
        for _attempt in range(20):
            candidate = _place(_shape(class_index, extent, rng), size, rng)
            if candidate is not None and not any(_overlaps(candidate[0], other) for other in placed):
                break
        else:
            continue
        box, points = candidate
        if class_index == 0:
            draw.ellipse(points, fill=colour)
        else:
            draw.polygon(points, fill=colour)
        placed.append(box)
        objects.append((class_index, box))
    return picture, objects


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Muted colour field + pixel noise + a few faint lines: texture without shape-like blobs."""
    coarse = rng.uniform(70, 190, size=(4, 4, 3))
    grey = coarse.mean(axis=2, keepdims=True)
    coarse = grey + 0.35 * (coarse - grey)  # low saturation, so objects stand out by colour
    field = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    )
    # uint8 arithmetic cannot wrap: the field stays within 70..190 and the noise within -18..18.
    noise = rng.integers(0, 37, size=(size, size, 3), dtype=np.uint8)
    picture = Image.fromarray(field + noise - np.uint8(18))
    draw = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(2, 7))):
        start, end = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        shade = tuple(int(v) for v in rng.uniform(60, 200, 3))
        draw.line([tuple(start), tuple(end)], fill=shade, width=int(rng.integers(1, 3)))
    return picture


def _object_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)
    pixel = Image.new("HSV", (1, 1), (int(hue * 255), int(saturation * 255), int(value * 255))).convert("RGB")
    return pixel.getpixel((0, 0))


def _shape(class_index: int, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Outline points [K, 2] centred on 0, about ``extent`` across (a circle: its two bounding corners)."""
    radius = extent / 2
    if class_index == 0:
        return np.array([[-radius, -radius], [radius, radius]])
    if class_index == 1:
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        radii = np.full(4, radius * math.sqrt(2) * 0.75)
    elif class_index == 2:
        angles = np.array([0, 2 / 3, 4 / 3]) * math.pi - math.pi / 2
        radii = np.full(3, radius)
    else:
        angles = np.arange(10) * math.pi / 5 - math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.42)
    angles = angles + rng.uniform(0, 2 * math.pi)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _place(
    shape: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[list[float], list[tuple[float, float]]] | None:
    """Random position fully inside the image: ``(tight box xyxy, polygon points)``, None if it cannot fit."""
    low, high = shape.min(axis=0), shape.max(axis=0)
    span = high - low
    if (span >= size - 2).any():
        return None
    corner = np.floor(rng.uniform(1, size - 1 - span))
    points = shape - low + corner
    # Integer vertices keep the rasterised shape and its box in agreement to the pixel: PIL fills pixel
    # columns min..max inclusive, i.e. the continuous extent [min, max + 1].
    points = np.round(points)
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0) + 1
    return [float(x1), float(y1), float(x2), float(y2)], [(float(x), float(y)) for x, y in points]


def _overlaps(a: list[float], b: list[float], margin: float = 3.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


@DATASETS.register()
class QuickstartDetection(CocoDetection):
    """The built-in shapes dataset (see the module docstring), generated into a cache folder on first use.

    Args:
        root: cache folder; None: ``$DFINE_CACHE/quickstart`` or ``~/.cache/dfine/quickstart``.
        split: ``train`` or ``val`` (any name works: each name draws different images).
        num_images: images in the split; None: 800 for train, 200 otherwise.
        seed: generator seed.
        image_size: square image side in pixels.
        transforms: a `Compose` or its config block.
        num_classes: the config's ``num_classes`` (4 here), passed by the builder.
        max_failed_fraction: see `CocoDetection`.
    """

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        num_images: int | None = None,
        seed: int = 0,
        image_size: int = 320,
        transforms: Callable[..., Any] | Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        max_failed_fraction: float = 0.01,
    ) -> None:
        count = num_images if num_images is not None else _DEFAULT_NUM_IMAGES.get(split, 200)
        folder = ensure_quickstart(root, split=split, num_images=count, seed=seed, image_size=image_size)
        super().__init__(
            str(folder / "images"),
            str(folder / "annotations.json"),
            transforms=transforms,
            num_classes=num_classes,
            max_failed_fraction=max_failed_fraction,
        )
