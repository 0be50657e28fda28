"""Objects365 preparation as the D-FINE papers used it (scripts in ``tools/dataset/``).

Expected layout (``BASE`` = e.g. ``/data/Objects365/data``)::

    BASE/train/zhiyuan_objv2_train.json   BASE/train/images/v1/patch0/*.jpg ...
    BASE/val/zhiyuan_objv2_val.json       BASE/val/images/v1/patch0/*.jpg ...

1. `merge_validation_into_train`: the first ``new_val_size`` (5000) validation images stay the validation set
   (``val/new_zhiyuan_objv2_val.json``); the rest join training (``train/new_zhiyuan_objv2_train.json``),
   their files reached through ``train/images_from_val/`` (symlinks by default, or copies).
2. `resize_coco_images`: images whose longer side exceeds ``max_size`` (640) are resized, saved beside the
   original as ``*_resized.jpg``, boxes and areas scaled; writes ``*_resized.json``.

The outputs are the files ``configs/dataset/obj365.yml`` points at.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from dfine.data.coco import read_json
from dfine.data.image_io import UnreadableImageError, load_image

__all__ = ["merge_validation_into_train", "resize_coco_images"]

logger = logging.getLogger(__name__)

TRAIN_JSON = "zhiyuan_objv2_train.json"
VAL_JSON = "zhiyuan_objv2_val.json"
FROM_VAL = "images_from_val"


def merge_validation_into_train(
    base_dir: str | os.PathLike,
    new_val_size: int = 5000,
    prefix: str = "new",
    images: Literal["symlink", "copy", "none"] = "symlink",
) -> tuple[Path, Path]:
    """Keep the first ``new_val_size`` validation images for validation and move the rest into training.

    Args:
        base_dir: folder holding ``train/`` and ``val/``.
        new_val_size: validation images kept (in the file's order).
        prefix: output names are ``{prefix}_zhiyuan_objv2_{train,val}.json``.
        images: how moved images appear under ``train/images_from_val/``: symlinks to ``val/`` (no extra
            disk), copies, or nothing (you copy them yourself).

    Returns:
        Paths of the new train and val annotation files.

    Raises:
        FileNotFoundError: an input annotation file is missing.
        ConfigError: an input annotation file is not valid JSON.
        ValueError: train and val share image ids (merging would corrupt evaluation).
    """
    base = Path(base_dir)
    train = read_json(base / "train" / TRAIN_JSON)
    val = read_json(base / "val" / VAL_JSON)
    kept, moved = val["images"][:new_val_size], val["images"][new_val_size:]
    moved_ids = {image["id"] for image in moved}
    clash = moved_ids & {image["id"] for image in train["images"]}
    if clash:
        raise ValueError(
            f"{len(clash)} validation image ids also occur in training (e.g. {sorted(clash)[:3]})."
        )

    kept_ids = {image["id"] for image in kept}
    new_val = {
        **val,
        "images": kept,
        "annotations": [a for a in val["annotations"] if a["image_id"] in kept_ids],
    }
    moved_images = []
    for image in moved:
        relocated = _relocated_name(image["file_name"])
        _place_image(base / "val" / image["file_name"], base / "train" / relocated, images)
        moved_images.append({**image, "file_name": relocated})
    moved_annotations = [a for a in val["annotations"] if a["image_id"] in moved_ids]
    new_train = {
        **train,
        "images": moved_images + train["images"],
        "annotations": moved_annotations + train["annotations"],
    }
    train_out = base / "train" / f"{prefix}_{TRAIN_JSON}"
    val_out = base / "val" / f"{prefix}_{VAL_JSON}"
    _save(new_train, train_out)
    _save(new_val, val_out)
    logger.info(
        "validation: %d images kept; training: %d + %d from validation",
        len(kept),
        len(train["images"]),
        len(moved),
    )
    return train_out, val_out


def resize_coco_images(
    ann_file: str | os.PathLike,
    img_folder: str | os.PathLike,
    max_size: int = 640,
    num_threads: int = 8,
    out_file: str | os.PathLike | None = None,
) -> Path:
    """Shrink images whose longer side exceeds ``max_size`` and scale their boxes to match.

    Resized copies are saved beside the originals as ``<name>_resized.jpg`` (EXIF orientation applied, so
    the pixels are upright like the annotations); images already small enough keep their file. Unreadable
    images are left out of the output with a warning.

    Returns:
        Path of the written annotation file (default ``<ann_file stem>_resized.json``).
    """
    ann_path = Path(ann_file)
    data = read_json(ann_path)
    by_image: dict[Any, list[dict[str, Any]]] = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)

    def process(image: dict[str, Any]) -> dict[str, Any] | None:
        path = Path(img_folder) / image["file_name"]
        try:
            picture = load_image(path)
        except (FileNotFoundError, UnreadableImageError) as error:
            logger.warning("skipping %s: %s", path, error)
            return None
        width, height = picture.size
        if max(width, height) <= max_size:
            return {**image, "width": width, "height": height}
        scale = max_size / max(width, height)
        new_size = (max(1, int(width * scale)), max(1, int(height * scale)))
        name = Path(image["file_name"])
        resized_name = str(name.with_name(f"{name.stem}_resized.jpg"))
        picture.resize(new_size, Image.Resampling.LANCZOS).save(Path(img_folder) / resized_name, quality=95)
        sx, sy = new_size[0] / width, new_size[1] / height
        for annotation in by_image.get(image["id"], []):
            x, y, w, h = annotation["bbox"]
            annotation["bbox"] = [x * sx, y * sy, w * sx, h * sy]
            if "area" in annotation:
                annotation["area"] = annotation["area"] * sx * sy
        return {**image, "file_name": resized_name, "width": new_size[0], "height": new_size[1]}

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(pool.map(process, data["images"]))
    images = [image for image in results if image is not None]
    kept_ids = {image["id"] for image in images}
    output = {
        **data,
        "images": images,
        "annotations": [a for a in data["annotations"] if a["image_id"] in kept_ids],
    }
    out_path = Path(out_file) if out_file is not None else ann_path.with_name(f"{ann_path.stem}_resized.json")
    _save(output, out_path)
    logger.info("%d of %d images kept, written %s", len(images), len(data["images"]), out_path)
    return out_path


def _relocated_name(file_name: str) -> str:
    """``images/v1/patch0/x.jpg`` -> ``images_from_val/v1/patch0/x.jpg`` (relative to ``train/``)."""
    parts = Path(file_name).parts
    return str(Path(FROM_VAL, *parts[1:])) if len(parts) > 1 else str(Path(FROM_VAL, file_name))


def _place_image(source: Path, destination: Path, mode: str) -> None:
    if mode == "none" or destination.exists() or destination.is_symlink():
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        destination.symlink_to(os.path.relpath(source.resolve(), destination.parent.resolve()))
    elif mode == "copy":
        shutil.copy2(source, destination)
    else:
        raise ValueError(f"images must be symlink, copy or none; got {mode!r}.")


def _save(data: dict[str, Any], path: Path) -> None:
    scratch = path.with_name(path.name + ".tmp")
    with open(scratch, "w", encoding="utf-8") as file:
        json.dump(data, file)
    os.replace(scratch, path)
