"""The built-in quickstart dataset: deterministic, valid COCO, tight boxes, generated once without races."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dfine.config.registry import DATASETS
from dfine.data import QuickstartDetection, check_dataset, ensure_quickstart, synthetic
from dfine.data.synthetic import QUICKSTART_CLASSES, generate_split


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_generator_is_deterministic_from_its_seed(tmp_path):
    first = _files(generate_split(tmp_path / "a", "train", num_images=5, seed=3))
    second = _files(generate_split(tmp_path / "b", "train", num_images=5, seed=3))
    assert first == second and len(first) == 6
    other_seed = _files(generate_split(tmp_path / "c", "train", num_images=5, seed=4))
    other_split = _files(generate_split(tmp_path / "d", "val", num_images=5, seed=3))
    assert other_seed["images/000000.jpg"] != first["images/000000.jpg"]
    assert other_split["images/000000.jpg"] != first["images/000000.jpg"]


def test_annotations_load_in_pycocotools_with_boxes_inside_the_images(tmp_path):
    folder = generate_split(tmp_path, "val", num_images=12, seed=0)
    coco = COCO(str(folder / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(QUICKSTART_CLASSES)
    assert len(coco.getImgIds()) == 12
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) >= 12
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        assert 20 <= max(w, h) <= 162 and x >= 0 and y >= 0 and x + w <= 320 and y + h <= 320
    assert {a["category_id"] for a in annotations} <= {1, 2, 3, 4}


def test_boxes_are_tight_around_the_drawn_shapes(tmp_path, monkeypatch):
    """On a black background every box must equal the extent of the non-black pixels inside it."""
    monkeypatch.setattr(synthetic, "_background", lambda rng, size: Image.new("RGB", (size, size)))
    folder = generate_split(tmp_path, "train", num_images=6, seed=1)
    document = json.loads((folder / "annotations.json").read_text())
    classes_seen = set()
    for annotation in document["annotations"]:
        pixels = np.asarray(Image.open(folder / "images" / f"{annotation['image_id'] - 1:06d}.jpg"))
        x, y, w, h = (int(v) for v in annotation["bbox"])
        window = (
            pixels[max(0, y - 2) : y + h + 2, max(0, x - 2) : x + w + 2].max(axis=2) > 100
        )  # JPEG: threshold
        ys, xs = np.nonzero(window)
        extent = [
            xs.min() + max(0, x - 2),
            ys.min() + max(0, y - 2),
            xs.max() + 1 + max(0, x - 2),
            ys.max() + 1 + max(0, y - 2),
        ]
        np.testing.assert_allclose(extent, [x, y, x + w, y + h], atol=0.5)
        classes_seen.add(annotation["category_id"])
    assert classes_seen == {1, 2, 3, 4}


def test_split_is_generated_once_and_concurrent_callers_agree(tmp_path):
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_quickstart(tmp_path, "train", 4, seed=0)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    folder = results[0]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["train4"], "no temporary folders left behind"
    stamp = (folder / "annotations.json").stat().st_mtime_ns
    assert ensure_quickstart(tmp_path, "train", 4, seed=0) == folder
    assert (folder / "annotations.json").stat().st_mtime_ns == stamp


def test_quickstart_dataset_builds_from_a_config_block_and_passes_the_check(tmp_path):
    dataset = DATASETS.build(
        {"type": "QuickstartDetection", "root": str(tmp_path), "split": "val", "num_images": 6}, num_classes=4
    )
    assert isinstance(dataset, QuickstartDetection) and len(dataset) == 6
    assert dataset.label_map.names == list(QUICKSTART_CLASSES) and dataset.label_map.category_ids == [
        1,
        2,
        3,
        4,
    ]
    image, target = dataset.load_item(0)
    assert image.size == (320, 320) and len(target["labels"]) >= 1
    report = check_dataset(dataset, images="decode")
    assert report.ok and not report.warnings, report.summary_lines()


def test_cache_root_follows_dfine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path))
    assert synthetic.default_cache_root() == tmp_path / "quickstart"
    monkeypatch.delenv("DFINE_CACHE")
    assert synthetic.default_cache_root() == Path.home() / ".cache" / "dfine" / "quickstart"


@pytest.mark.slow
def test_full_quickstart_generates_in_seconds(tmp_path):
    import time

    start = time.perf_counter()
    ensure_quickstart(tmp_path, "train", 800)
    ensure_quickstart(tmp_path, "val", 200)
    assert time.perf_counter() - start < 60
