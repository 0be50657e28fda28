"""Write a synthetic COCO-format annotation file of any size (and optionally hard-linked tiny images).

Used to measure the data pipeline at real scale without the real data::

    # COCO-train size: 118k images, ~7.3 boxes per image, 80 classes
    python tools/dataset/make_synthetic_coco.py /work/scale/coco.json --images 118287 --boxes 7.3 --classes 80
    # Objects365 size: 1.74M images, ~14.6 boxes per image, 365 classes
    python tools/dataset/make_synthetic_coco.py /work/scale/o365.json --images 1742289 --boxes 14.6 \
        --classes 365
    # plus 400k hard links to one tiny JPEG, for the image checks
    python tools/dataset/make_synthetic_coco.py /work/scale/links.json --images 400000 \
        --image-dir /work/scale/img

The file is written in chunks (memory stays small whatever the size); boxes per image follow a Poisson law
with the given mean, image ids are 1..N in a shuffled order (as real files are not sorted), image sizes vary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

_CHUNK = 20_000  # images written per chunk
_LINKS_PER_FILE = 60_000


def write_annotation_file(
    path: str | os.PathLike,
    num_images: int,
    boxes_per_image: float,
    num_classes: int,
    seed: int = 0,
    file_pattern: str = "images/{:09d}.jpg",
) -> int:
    """Write the JSON file; returns the number of annotations written."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(num_images) + 1
    widths = rng.integers(320, 1024, num_images)
    heights = rng.integers(240, 1024, num_images)
    counts = rng.poisson(boxes_per_image, num_images)
    scratch = Path(f"{path}.tmp")
    with open(scratch, "w", encoding="utf-8") as file:
        file.write('{"info": {"description": "synthetic"}, "images": [')
        for start in range(0, num_images, _CHUNK):
            stop = min(start + _CHUNK, num_images)
            parts = [
                f'{{"id": {ids[i]}, "file_name": "{file_pattern.format(ids[i])}", '
                f'"width": {widths[i]}, "height": {heights[i]}}}'
                for i in range(start, stop)
            ]
            file.write((", " if start else "") + ", ".join(parts))
        file.write('], "annotations": [')
        annotation_id = 1
        for start in range(0, num_images, _CHUNK):
            stop = min(start + _CHUNK, num_images)
            owners = np.repeat(np.arange(start, stop), counts[start:stop])
            n = len(owners)
            x = rng.random(n) * widths[owners] * 0.8
            y = rng.random(n) * heights[owners] * 0.8
            w = 1 + rng.random(n) * (widths[owners] - x - 1)
            h = 1 + rng.random(n) * (heights[owners] - y - 1)
            categories = rng.integers(1, num_classes + 1, n)
            parts = [
                f'{{"id": {annotation_id + k}, "image_id": {ids[o]}, "category_id": {c}, '
                f'"bbox": [{a:.2f}, {b:.2f}, {cw:.2f}, {ch:.2f}], "area": {cw * ch:.2f}, "iscrowd": 0}}'
                for k, (o, c, a, b, cw, ch) in enumerate(
                    zip(
                        owners.tolist(),
                        categories.tolist(),
                        x.tolist(),
                        y.tolist(),
                        w.tolist(),
                        h.tolist(),
                        strict=True,
                    )
                )
            ]
            if parts:
                file.write((", " if annotation_id > 1 else "") + ", ".join(parts))
            annotation_id += n
        categories_json = json.dumps(
            [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in range(1, num_classes + 1)]
        )
        file.write(f'], "categories": {categories_json}}}')
    os.replace(scratch, path)
    return annotation_id - 1


def link_images(folder: str | os.PathLike, num_images: int, file_pattern: str = "images/{:09d}.jpg") -> None:
    """Hard-link one tiny JPEG under every file name of the annotation file (ids 1..N): no extra disk."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    made: set[Path] = set()
    for image_id in range(1, num_images + 1):
        source = root / f"_source{image_id // _LINKS_PER_FILE}.jpg"  # ext4 allows 65000 links per inode
        if not source.exists():
            Image.new("RGB", (32, 24), (120, 60, 30)).save(source, quality=80)
        target = root / file_pattern.format(image_id)
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        if not target.exists():
            os.link(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", help="annotation JSON to write")
    parser.add_argument("--images", type=int, default=118_287, help="number of images")
    parser.add_argument("--boxes", type=float, default=7.3, help="mean boxes per image")
    parser.add_argument("--classes", type=int, default=80, help="number of categories (ids 1..N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-dir", help="also hard-link a tiny JPEG for every image under this folder")
    args = parser.parse_args()
    start = time.perf_counter()
    count = write_annotation_file(args.output, args.images, args.boxes, args.classes, args.seed)
    size_mb = os.path.getsize(args.output) / 2**20
    print(
        f"{args.output}: {args.images} images, {count} boxes, {size_mb:.0f} MB "
        f"in {time.perf_counter() - start:.0f} s"
    )
    if args.image_dir:
        start = time.perf_counter()
        link_images(args.image_dir, args.images)
        print(f"{args.image_dir}: {args.images} hard links in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
