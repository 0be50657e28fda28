"""Objects365 preparation on a small fake layout: validation merge, image resizing with boxes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfine.data import CocoDetection, check_dataset
from dfine.data.obj365 import merge_validation_into_train, resize_coco_images

ROOT = Path(__file__).resolve().parents[2]


def _coco(images: list[tuple[int, str, int, int]], boxes_per_image: int = 1) -> dict:
    annotations = []
    for image_id, _, width, height in images:
        for k in range(boxes_per_image):
            annotations.append(
                {
                    "id": image_id * 10 + k,
                    "image_id": image_id,
                    "category_id": 1 + k,
                    "bbox": [width / 4, height / 4, width / 2, height / 2],
                    "area": width * height / 4,
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "sneakers"}],
    }


@pytest.fixture
def fake_obj365(tmp_path: Path) -> Path:
    """base/{train,val}/images/v1/patch0/*.jpg with the original JSON names; 3 train and 4 val images."""
    rng = np.random.default_rng(0)
    layout = {
        "train": [
            (1, "images/v1/patch0/t1.jpg", 120, 60),
            (2, "images/v1/patch0/t2.jpg", 30, 20),
            (3, "images/v1/patch0/t3.jpg", 50, 90),
        ],
        "val": [
            (11, "images/v1/patch0/v1.jpg", 80, 40),
            (12, "images/v1/patch0/v2.jpg", 40, 40),
            (13, "images/v2/patch1/v3.jpg", 64, 100),
            (14, "images/v2/patch1/v4.jpg", 30, 30),
        ],
    }
    for split, images in layout.items():
        for _, name, width, height in images:
            path = tmp_path / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=95)
        json_name = f"zhiyuan_objv2_{split}.json"
        (tmp_path / split / json_name).write_text(json.dumps(_coco(images, boxes_per_image=2)))
    return tmp_path


def test_validation_beyond_the_first_images_moves_into_training(fake_obj365):
    train_file, val_file = merge_validation_into_train(fake_obj365, new_val_size=2)
    assert train_file == fake_obj365 / "train" / "new_zhiyuan_objv2_train.json"
    val, train = json.loads(val_file.read_text()), json.loads(train_file.read_text())
    assert [i["id"] for i in val["images"]] == [11, 12]
    assert {a["image_id"] for a in val["annotations"]} == {11, 12}
    assert sorted(i["id"] for i in train["images"]) == [1, 2, 3, 13, 14]
    assert len(train["annotations"]) == 10 and train["categories"] == val["categories"]
    moved = {i["id"]: i["file_name"] for i in train["images"] if i["id"] > 10}
    assert moved == {13: "images_from_val/v2/patch1/v3.jpg", 14: "images_from_val/v2/patch1/v4.jpg"}

    # Both new sets load, with every image reachable (the moved ones through symlinks).
    for folder, ann in ((fake_obj365 / "train", train_file), (fake_obj365 / "val", val_file)):
        report = check_dataset(CocoDetection(str(folder), str(ann)))
        assert report.ok and not report.warnings, report.summary_lines()


def test_merge_refuses_clashing_image_ids(fake_obj365):
    val_json = fake_obj365 / "val" / "zhiyuan_objv2_val.json"
    document = json.loads(val_json.read_text())
    document["images"][3]["id"] = 1
    val_json.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="also occur in training"):
        merge_validation_into_train(fake_obj365, new_val_size=2, images="none")


def test_a_missing_or_malformed_annotation_file_is_named_in_the_error(fake_obj365):
    (fake_obj365 / "train" / "zhiyuan_objv2_train.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*zhiyuan_objv2_train\.json"):
        merge_validation_into_train(fake_obj365, images="none")
    (fake_obj365 / "train" / "zhiyuan_objv2_train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"zhiyuan_objv2_train\.json: not valid JSON"):
        merge_validation_into_train(fake_obj365, images="none")


def test_resize_shrinks_large_images_and_scales_their_boxes(fake_obj365):
    ann_file = fake_obj365 / "train" / "zhiyuan_objv2_train.json"
    out = resize_coco_images(ann_file, fake_obj365 / "train", max_size=40, num_threads=2)
    assert out.name == "zhiyuan_objv2_train_resized.json"
    document = json.loads(out.read_text())
    images = {i["id"]: i for i in document["images"]}
    assert (images[1]["width"], images[1]["height"], images[1]["file_name"]) == (
        40,
        20,
        "images/v1/patch0/t1_resized.jpg",
    )
    assert (images[2]["width"], images[2]["height"], images[2]["file_name"]) == (
        30,
        20,
        "images/v1/patch0/t2.jpg",
    )
    assert (images[3]["width"], images[3]["height"]) == (22, 40)
    assert Image.open(fake_obj365 / "train" / images[1]["file_name"]).size == (40, 20)
    box = next(a for a in document["annotations"] if a["image_id"] == 1)
    np.testing.assert_allclose(box["bbox"], [10, 5, 20, 10])
    np.testing.assert_allclose(box["area"], 1800 / 9)
    report = check_dataset(CocoDetection(str(fake_obj365 / "train"), str(out)))
    assert report.ok and not report.warnings, report.summary_lines()


def _run_tool(script: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / "tools" / "dataset" / script), run_name="__main__")


def test_tools_run_from_the_command_line(fake_obj365, monkeypatch, capsys):
    base = str(fake_obj365)
    _run_tool("obj365_merge_val.py", "--base-dir", base, "--new-val-size", "3", monkeypatch=monkeypatch)
    train_json = fake_obj365 / "train" / "new_zhiyuan_objv2_train.json"
    _run_tool(
        "resize_images.py",
        "--ann-file",
        str(train_json),
        "--img-folder",
        f"{base}/train",
        monkeypatch=monkeypatch,
    )
    assert "wrote" in capsys.readouterr().out
    resized = json.loads((fake_obj365 / "train" / "new_zhiyuan_objv2_train_resized.json").read_text())
    assert len(resized["images"]) == 4
