"""Dataset formats: COCO JSON, YOLO txt and VOC XML agree; EXIF orientation; category remap; num_classes."""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfine.config.registry import ConfigError
from dfine.data import CocoDetection, LabelMap, VOCDetection, YoloDetection, check_dataset

# (file name, width, height, [(x, y, w, h, class index), ...]); the third image has no objects.
IMAGES = [
    ("a.png", 64, 48, [(4, 6, 20, 10, 0), (30, 20, 30, 25, 2)]),
    ("b.png", 40, 56, [(0, 0, 40, 56, 1)]),
    ("c.png", 32, 32, []),
]
NAMES = ["cat", "dog", "bird"]


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, width, height, _ in IMAGES:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)


def _write_coco(path: Path, category_ids: list[int]) -> None:
    images, annotations = [], []
    for image_id, (name, width, height, objects) in enumerate(IMAGES, start=10):
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for x, y, w, h, cls in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[cls],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cid, "name": name} for cid, name in zip(category_ids, NAMES, strict=True)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.fixture
def three_formats(tmp_path: Path) -> dict[str, object]:
    """The same three images annotated as COCO JSON, YOLO txt and Pascal VOC."""
    _write_images(tmp_path / "images" / "train")
    _write_coco(tmp_path / "coco.json", [5, 7, 9])

    labels = tmp_path / "labels" / "train"
    labels.mkdir(parents=True)
    for name, width, height, objects in IMAGES[:2]:  # c.png has no label file: an empty image
        lines = [
            f"{c} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}"
            for x, y, w, h, c in objects
        ]
        (labels / name.replace(".png", ".txt")).write_text("\n".join(lines))
    (tmp_path / "data.yaml").write_text("names: {0: cat, 1: dog, 2: bird}\n")

    voc = tmp_path / "voc"
    (voc / "xml").mkdir(parents=True)
    pairs = []
    for name, width, height, objects in IMAGES:
        body = "".join(
            f"<object><name>{NAMES[c]}</name><bndbox><xmin>{x}</xmin><ymin>{y}</ymin>"
            f"<xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
            for x, y, w, h, c in objects
        )
        xml = f"<annotation><size><width>{width}</width><height>{height}</height></size>{body}</annotation>"
        (voc / "xml" / name.replace(".png", ".xml")).write_text(xml)
        pairs.append(f"../images/train/{name} xml/{name.replace('.png', '.xml')}")
    (voc / "trainval.txt").write_text("\n".join(pairs))
    (voc / "label_list.txt").write_text("\n".join(NAMES))
    return {
        "coco": CocoDetection(str(tmp_path / "images" / "train"), str(tmp_path / "coco.json")),
        "yolo": YoloDetection(str(tmp_path / "images" / "train"), names=str(tmp_path / "data.yaml")),
        "voc": VOCDetection(str(voc)),
    }


def test_yolo_and_voc_give_the_same_targets_as_the_equivalent_coco_json(three_formats):
    coco = three_formats["coco"]
    for other in (three_formats["yolo"], three_formats["voc"]):
        assert len(other) == len(coco) == 3
        assert other.label_map.names == coco.label_map.names == NAMES
        for index in range(len(coco)):
            image_a, target_a = coco.load_item(index)
            image_b, target_b = other.load_item(index)
            assert image_a.size == image_b.size
            torch.testing.assert_close(target_a["labels"], target_b["labels"])
            torch.testing.assert_close(
                target_a["boxes"].as_subclass(torch.Tensor),
                target_b["boxes"].as_subclass(torch.Tensor),
                atol=1e-4,
                rtol=0,
            )
            torch.testing.assert_close(target_a["orig_size"], target_b["orig_size"])
    assert three_formats["coco"].load_item(0)[1]["labels"].tolist() == [0, 2]


def test_every_format_passes_the_same_dataset_check(three_formats):
    for dataset in three_formats.values():
        report = check_dataset(dataset)
        assert report.ok and not report.warnings, report.summary_lines()
        assert report.num_annotations == 3
        assert report.count("empty") == 1


def test_yolo_and_voc_convert_to_coco_json_with_pixel_boxes(three_formats):
    for name in ("yolo", "voc"):
        document = three_formats[name].to_coco_dict()
        assert [image["width"] for image in document["images"]] == [64, 40, 32]
        boxes = [annotation["bbox"] for annotation in document["annotations"]]
        np.testing.assert_allclose(boxes, [[4, 6, 20, 10], [30, 20, 30, 25], [0, 0, 40, 56]], atol=1e-4)
        assert [c["id"] for c in document["categories"]] == [0, 1, 2]


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 64 wide x 32 high, left half red, right half blue, EXIF orientation 6 (turn 90 deg right)."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[0x0112] = 6
    picture.save(path, quality=95, exif=exif.tobytes())


def test_exif_rotated_jpeg_loads_upright_and_the_box_check_uses_the_upright_size(tmp_path):
    _exif_rotated_jpeg(tmp_path / "phone.jpg")
    # Annotated upright (32 wide x 64 high): the box reaches y = 60, outside the stored 32-pixel height.
    document = {
        "images": [{"id": 1, "file_name": "phone.jpg", "width": 32, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 40, 20, 20], "area": 400}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(document))
    dataset = CocoDetection(str(tmp_path), str(tmp_path / "ann.json"))

    image, target = dataset.load_item(0)
    assert image.size == (32, 64)
    top, bottom = np.asarray(image)[4, 16], np.asarray(image)[60, 16]
    assert top[0] > 200 and top[2] < 60, f"the stored left (red) half must be on top, got {top}"
    assert bottom[2] > 200 and bottom[0] < 60
    assert target["orig_size"].tolist() == [32, 64]
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[2.0, 40.0, 22.0, 60.0]])
    )

    report = check_dataset(dataset)
    assert report.ok and report.count("outside") == 0 and report.count("size_mismatch") == 0, (
        report.summary_lines()
    )


@pytest.mark.parametrize(
    "category_ids", [[1, 2, 3], [1, 44, 90], [0, 1, 2]], ids=["1..3", "sparse", "from-0"]
)
def test_category_ids_map_to_contiguous_labels_and_back(tmp_path, category_ids):
    _write_images(tmp_path)
    _write_coco(tmp_path / "ann.json", category_ids)
    dataset = CocoDetection(str(tmp_path), str(tmp_path / "ann.json"), num_classes=3)
    assert dataset.label_map.category_ids == category_ids
    assert [dataset.category_to_label(cid) for cid in category_ids] == [0, 1, 2]
    assert [dataset.label_to_category(label) for label in range(3)] == category_ids
    labels = dataset.load_item(0)[1]["labels"].tolist()
    assert [dataset.label_to_category(label) for label in labels] == [category_ids[0], category_ids[2]]
    assert LabelMap.from_entries(dataset.label_map.to_entries()) == dataset.label_map
    assert dataset.label_map.labels_for(np.array([category_ids[1], 12345])).tolist() == [1, -1]
    with pytest.raises(KeyError, match="12345"):
        dataset.category_to_label(12345)


def test_coco_category_order_in_the_file_does_not_change_labels(tmp_path):
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    label_map = LabelMap(categories)
    assert label_map.names == ["person", "car", "toothbrush"]
    assert label_map.category_to_label(90) == 2


def test_too_small_num_classes_names_the_file_and_the_right_value(tmp_path, caplog):
    _write_images(tmp_path)
    _write_coco(tmp_path / "ann.json", [1, 2, 3])
    with pytest.raises(ConfigError, match=r"ann\.json has 3 categories.*num_classes: 3"):
        CocoDetection(str(tmp_path), str(tmp_path / "ann.json"), num_classes=2)
    with caplog.at_level(logging.WARNING):
        CocoDetection(str(tmp_path), str(tmp_path / "ann.json"), num_classes=5)
    assert "never trained" in caplog.text


def test_a_missing_or_malformed_annotation_file_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*none\.json \(check ann_file"):
        CocoDetection(str(tmp_path), str(tmp_path / "none.json"))
    (tmp_path / "cut.json").write_text('{"images": [')
    with pytest.raises(ConfigError, match=r"cut\.json: not valid JSON \(.*line 1"):
        CocoDetection(str(tmp_path), str(tmp_path / "cut.json"))


def test_duplicate_category_ids_are_rejected():
    with pytest.raises(ValueError, match="category id 4 is listed twice"):
        LabelMap([{"id": 4, "name": "a"}, {"id": 4, "name": "b"}])


def test_crowd_boxes_are_not_training_targets_and_empty_images_are_kept(tmp_path):
    _write_images(tmp_path)
    _write_coco(tmp_path / "ann.json", [1, 2, 3])
    document = json.loads((tmp_path / "ann.json").read_text())
    document["annotations"][0]["iscrowd"] = 1
    (tmp_path / "ann.json").write_text(json.dumps(document))
    dataset = CocoDetection(str(tmp_path), str(tmp_path / "ann.json"))
    assert dataset.load_item(0)[1]["labels"].tolist() == [2]
    assert len(dataset) == 3 and len(dataset.load_item(2)[1]["labels"]) == 0
    assert dataset.to_coco_dict()["annotations"][0]["iscrowd"] == 1


def test_convert_tools_write_coco_json_equal_to_the_original(three_formats, tmp_path, monkeypatch, capsys):
    tools = Path(__file__).resolve().parents[2] / "tools" / "dataset"
    images = tmp_path / "images" / "train"
    runs = {
        "convert_yolo.py": ["--img-folder", str(images), "--names", str(tmp_path / "data.yaml")],
        "convert_voc.py": ["--root", str(tmp_path / "voc")],
    }
    for script, args in runs.items():
        out = tmp_path / f"{script}.json"
        monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(out)])
        runpy.run_path(str(tools / script), run_name="__main__")
        folder = images if script == "convert_yolo.py" else tmp_path / "voc"
        converted = CocoDetection(str(folder), str(out))
        for index in range(3):
            expected, got = three_formats["coco"].load_item(index)[1], converted.load_item(index)[1]
            torch.testing.assert_close(expected["labels"], got["labels"])
            torch.testing.assert_close(
                expected["boxes"].as_subclass(torch.Tensor), got["boxes"].as_subclass(torch.Tensor)
            )
    assert "-> OK" in capsys.readouterr().out
