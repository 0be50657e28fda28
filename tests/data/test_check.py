"""Bad data gives its documented outcome: a clear error naming the file, or sanitised with a warning."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dfine.data import CocoDetection, UnreadableImageError, build_transforms, check_dataset
from dfine.data.base import finalize_sample

GOOD, TRUNCATED, GARBAGE, MISSING = "good.jpg", "truncated.jpg", "garbage.jpg", "missing.jpg"

TRAIN_TRANSFORMS = """
type: Compose
ops:
  - {type: RandomPhotometricDistort, p: 0.5}
  - {type: RandomZoomOut, fill: 0}
  - {type: RandomIoUCrop, p: 0.8}
  - {type: SanitizeBoundingBoxes, min_size: 1}
  - {type: RandomHorizontalFlip}
  - {type: Resize, size: [64, 64]}
  - {type: SanitizeBoundingBoxes, min_size: 1}
  - {type: ConvertPILImage, dtype: 'float32', scale: True}
  - {type: ConvertBoxes, fmt: 'cxcywh', normalize: True}
"""


def _jpeg_bytes(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def bad_dataset(tmp_path: Path) -> CocoDetection:
    """Four 64 x 48 images (one good, one truncated, one not an image, one missing) and flawed boxes."""
    (tmp_path / GOOD).write_bytes(_jpeg_bytes(0))
    data = _jpeg_bytes(1)
    (tmp_path / TRUNCATED).write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / GARBAGE).write_bytes(b"this is not a picture" * 10)
    images = [
        {"id": i + 1, "file_name": name, "width": 64, "height": 48}
        for i, name in enumerate([GOOD, TRUNCATED, GARBAGE, MISSING])
    ]
    boxes = [
        ([10, 10, 20, 20], 1),  # fine
        ([50, 30, 30, 30], 1),  # partly outside: x2 = 80 > 64, y2 = 60 > 48 -> clipped
        ([100, 10, 5, 5], 2),  # entirely outside -> dropped
        ([5, 5, 0, 10], 2),  # zero width -> dropped
        ([5, 5, 10, 10], 99),  # unknown category -> dropped
    ]
    annotations = [
        {"id": k + 1, "image_id": 1, "category_id": c, "bbox": b, "area": 1.0, "iscrowd": 0}
        for k, (b, c) in enumerate(boxes)
    ]
    annotations.append({"id": 50, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100})
    annotations.append({"id": 51, "image_id": 777, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100})
    document = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(document))
    return CocoDetection(str(tmp_path), str(tmp_path / "ann.json"))


def test_check_reports_each_kind_once_with_errors_for_unusable_files(bad_dataset):
    report = check_dataset(bad_dataset)
    assert not report.ok
    assert [f.kind for f in report.errors] == ["missing image files", "unreadable images"]
    assert MISSING in report.findings["missing"].examples[0]
    assert GARBAGE in report.findings["unreadable"].examples[0]
    counts = {
        key: report.count(key) for key in ("outside", "beyond", "degenerate", "unknown_category", "orphans")
    }
    assert counts == {"outside": 1, "beyond": 1, "degenerate": 1, "unknown_category": 1, "orphans": 1}
    assert report.count("truncated") == 1, "the default check finds the missing end-of-image marker"
    assert TRUNCATED in report.findings["truncated"].examples[0]
    lines = report.summary_lines()
    assert "NOT OK" in lines[0]
    assert sum("ERROR" in line for line in lines) == 2 and sum("WARNING" in line for line in lines) == 6
    assert any("category_id 99" in line for line in lines)


def test_decode_mode_also_finds_truncated_images(bad_dataset):
    report = check_dataset(bad_dataset, images="decode", num_threads=2)
    assert report.count("truncated") == 1 and TRUNCATED in report.findings["truncated"].examples[0]
    assert report.findings["truncated"].severity == "warning"


def test_a_clean_dataset_passes(bad_dataset, tmp_path):
    document = json.loads((tmp_path / "ann.json").read_text())
    document["images"] = document["images"][:1]
    document["annotations"] = [a for a in document["annotations"] if a["id"] == 1]
    (tmp_path / "clean.json").write_text(json.dumps(document))
    report = check_dataset(CocoDetection(str(tmp_path), str(tmp_path / "clean.json")))
    assert report.ok and not report.warnings and "-> OK" in report.summary_lines()[0]


def test_flawed_boxes_are_clipped_or_dropped_when_loading(bad_dataset):
    _, target = bad_dataset.load_item(0)
    boxes = target["boxes"].as_subclass(torch.Tensor)
    torch.testing.assert_close(boxes, torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 30.0, 64.0, 48.0]]))
    assert target["labels"].tolist() == [0, 0]


def test_missing_and_unreadable_images_raise_errors_naming_the_file(bad_dataset):
    with pytest.raises(FileNotFoundError, match=MISSING):
        bad_dataset.load_item(3)
    with pytest.raises(UnreadableImageError, match=GARBAGE):
        bad_dataset.load_item(2)


def test_truncated_jpeg_loads_with_a_warning_naming_the_file(bad_dataset, caplog):
    with caplog.at_level(logging.WARNING):
        image, target = bad_dataset.load_item(1)
    assert image.size == (64, 48) and target["labels"].tolist() == [0]
    assert TRUNCATED in caplog.text


def test_training_pipeline_runs_on_every_loadable_image_with_flawed_boxes(bad_dataset):
    bad_dataset.transforms = build_transforms(yaml.safe_load(TRAIN_TRANSFORMS))
    torch.manual_seed(0)
    for _ in range(10):
        for index in (0, 1):
            image, target = bad_dataset[index]
            assert image.shape == (3, 64, 64)
            boxes = target["boxes"]
            assert bool(((boxes >= 0) & (boxes <= 1)).all()) and bool((boxes[:, 2:] > 0).all())
            assert len(target["labels"]) == len(boxes)


def test_empty_pipeline_output_still_meets_the_target_contract(bad_dataset):
    image, target = finalize_sample(*bad_dataset.load_item(0))
    assert image.dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert target["image_id"].dtype == torch.int64 and target["orig_size"].tolist() == [64, 48]


def test_malformed_bbox_entries_are_reported_not_fatal(tmp_path):
    (tmp_path / GOOD).write_bytes(_jpeg_bytes(0))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2], "area": 1},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": None},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8]},
    ]
    document = {
        "images": [{"id": 1, "file_name": GOOD, "width": 64, "height": 48}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(document))
    dataset = CocoDetection(str(tmp_path), str(tmp_path / "ann.json"))
    assert check_dataset(dataset).count("degenerate") == 2
    assert dataset.load_item(0)[1]["boxes"].tolist() == [[4.0, 4.0, 12.0, 12.0]]


def test_existing_files_reads_folder_listings_and_tells_files_from_everything_else(tmp_path):
    from dfine.data.check import existing_files

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"x")
    (tmp_path / "a" / "folder.jpg").mkdir()  # listed, but not a file
    (tmp_path / "a" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "b.jpg").write_bytes(b"b")
    paths = [
        str(tmp_path / "a" / "x.jpg"),
        str(tmp_path / "a" / "missing.jpg"),
        str(tmp_path / "a" / "folder.jpg"),
        str(tmp_path / "a" / "dangling.jpg"),
        str(tmp_path / "b.jpg"),
        str(tmp_path / "no-such-folder" / "y.jpg"),  # unlistable folder: falls back to isfile
    ]
    assert existing_files(paths, num_threads=2) == [True, False, False, False, True, False]
    assert existing_files(paths, num_threads=2) == [os.path.isfile(path) for path in paths]
