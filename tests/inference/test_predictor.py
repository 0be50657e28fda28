"""``dfine-predict``, `dfine.inference.predictor.Predictor` and `drawing.draw_detections` on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import CONFIG, SIZE, tiny_overrides

import dfine
from dfine.checkpoint import load_weights_strict
from dfine.cli import predict as predict_cli
from dfine.data import build_dataloader, original_frame_size
from dfine.data.synthetic import generate_split
from dfine.evaluation.loop import predict_batch
from dfine.inference.drawing import draw_detections
from dfine.inference.predictor import resolve_class_table
from dfine.models.coco_categories import COCO80_TO_COCO91, COCO_NAMES

NAMES = ["alpha", "beta", "gamma", "delta"]
CATEGORY_IDS = [3, 5, 7, 9]  # not 1..4, so a label printed as its own id would show
THRESHOLD = 0.1
# Widths x heights of the pictures: none square and none at the model's input size, so the way back to
# original pixels (stretched or letterboxed) is exercised.
PICTURE_SIZES = [(120, 80), (72, 100), (150, 90)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three generated non-square pictures as a COCO dataset, and a checkpoint of a random tiny model.

    The checkpoint holds different ``model`` and ``ema`` weights (prediction must use the EMA ones) and a
    label map with names the config does not know.
    """
    root = tmp_path_factory.mktemp("predict")
    generate_split(root / "shapes", "val", len(PICTURE_SIZES), image_size=160)
    images = []
    for index, (width, height) in enumerate(PICTURE_SIZES):
        path = root / "shapes" / "images" / f"{index:06d}.jpg"
        Image.open(path).crop((0, 0, width, height)).save(path, quality=95)
        images.append({"id": index + 1, "file_name": path.name, "width": width, "height": height})
    categories = [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, NAMES, strict=True)]
    annotations = root / "shapes" / "plain.json"
    annotations.write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    (root / "shapes" / "images" / "notes.txt").write_text("not a picture")  # ignored: not an image suffix
    (root / "shapes" / "images" / "zz_broken.png").write_bytes(b"not a png")  # skipped with a warning

    overrides = tiny_overrides(root / "run", root / "data")
    cfg = dfine.load_config(CONFIG, overrides)
    torch.manual_seed(0)
    model = dfine.build_model(cfg)
    ema_weights, model_weights = {}, {}
    parameters = {name for name, _ in model.named_parameters()}  # not buffers: BatchNorm variances stay > 0
    for key, value in model.state_dict().items():
        noisy = key in parameters
        # Random heads: an untrained model scores every query alike and boxes sit on their anchors.
        ema_weights[key] = value + 0.3 * torch.randn_like(value) if noisy else value
        model_weights[key] = value + 0.3 * torch.randn_like(value) if noisy else value
    checkpoint = root / "weights.pth"
    pairs = zip(CATEGORY_IDS, NAMES, strict=True)
    label_map = [{"label": i, "category_id": c, "name": n} for i, (c, n) in enumerate(pairs)]
    torch.save({"model": model_weights, "ema": {"module": ema_weights}, "label_map": label_map}, checkpoint)
    return {
        "root": root,
        "images": root / "shapes" / "images",
        "annotations": annotations,
        "checkpoint": checkpoint,
        "overrides": overrides,
        "ema_weights": ema_weights,
    }


def _dataset_overrides(setup: dict, keep_ratio: bool) -> list[str]:
    """Val loader reading the generated pictures, in the loader's own batches of 2 (as --batch-size 2)."""
    resize = f"{{type: Resize, size: [{SIZE}, {SIZE}], keep_ratio: {str(keep_ratio).lower()}}}"
    return [
        *setup["overrides"],
        f"val_dataloader.dataset={{type: CocoDetection, img_folder: {setup['images']}, "
        f"ann_file: {setup['annotations']}, transforms: {{type: Compose, ops: [{resize}, "
        "{type: ConvertPILImage, dtype: float32, scale: true}]}}",
    ]


def _arguments(
    setup: dict, source: Path, output: Path, *extra: str, overrides: list[str] | None = None
) -> list[str]:
    """dfine-predict arguments for the tiny config (``-u`` last: it takes every value that follows)."""
    checkpoint = str(setup["checkpoint"])
    files = ["--input", str(source), "--output", str(output)]
    return ["-c", str(CONFIG), "-r", checkpoint, *files, *extra, "-u", *(overrides or setup["overrides"])]


def _predict(setup: dict, overrides: list[str], out: Path, *extra: str) -> int:
    """Predict on the generated folder at THRESHOLD, in batches of 2 like the validation loader."""
    options = ["--threshold", str(THRESHOLD), "--batch-size", "2", *extra]
    return predict_cli.main(_arguments(setup, setup["images"], out, *options, overrides=overrides))


def _expected_detections(setup: dict, overrides: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Model + postprocessor on the validation loader's batches: per file, boxes xyxy pixels, scores, ids."""
    cfg = dfine.load_config(CONFIG, overrides)
    model = dfine.build_model(cfg)
    load_weights_strict(model, setup["ema_weights"])
    model.deploy()
    postprocessor = dfine.build_postprocessor(cfg).eval()
    loader = build_dataloader(cfg["val_dataloader"], split="val", num_classes=4)
    file_of_id = {image["id"]: image["file_name"] for image in loader.dataset.to_coco_dict()["images"]}
    expected = {}
    with torch.no_grad():
        for images, targets in loader:
            frames = torch.stack([original_frame_size(target) for target in targets])
            results = predict_batch(model, postprocessor, images, frames)
            for target, result in zip(targets, results, strict=True):
                keep = result["scores"] >= THRESHOLD
                expected[file_of_id[int(target["image_id"])]] = {
                    "boxes": result["boxes"][keep],
                    "scores": result["scores"][keep],
                    "category_ids": torch.tensor(CATEGORY_IDS)[result["labels"][keep]],
                }
    return expected


@pytest.mark.parametrize("keep_ratio", [False, True], ids=["stretch", "letterbox"])
def test_predict_on_generated_images_writes_pictures_and_json_equal_to_the_postprocessor_output(
    setup: dict, tmp_path: Path, keep_ratio: bool
) -> None:
    overrides = _dataset_overrides(setup, keep_ratio)
    assert _predict(setup, overrides, tmp_path) == 0
    expected = _expected_detections(setup, overrides)
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert sum(len(e["scores"]) for e in expected.values()) >= 3, "too few detections to compare"
    for index, (width, height) in enumerate(PICTURE_SIZES):
        name = f"{index:06d}.jpg"
        mine = [r for r in records if r["file_name"] == name]
        assert {r["image_id"] for r in mine} <= {index + 1}
        bbox = torch.tensor([r["bbox"] for r in mine], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], dim=1)
        torch.testing.assert_close(boxes, expected[name]["boxes"], atol=2e-3, rtol=0)
        scores = torch.tensor([r["score"] for r in mine], dtype=torch.float32)
        torch.testing.assert_close(scores, expected[name]["scores"], atol=1e-5, rtol=0)
        assert [r["category_id"] for r in mine] == expected[name]["category_ids"].tolist()
        assert [r["name"] for r in mine] == [NAMES[CATEGORY_IDS.index(r["category_id"])] for r in mine]
        picture = Image.open(tmp_path / name)
        assert picture.size == (width, height)
        original = np.asarray(Image.open(setup["images"] / name), dtype=np.int16)
        changed = np.abs(np.asarray(picture, dtype=np.int16) - original).max()
        assert not mine or changed > 60, f"{name}: the detections are not drawn"


def test_folder_input_prints_a_row_per_readable_image_with_the_checkpoint_class_names(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _predict(setup, setup["overrides"], tmp_path, "--save-json", str(tmp_path / "all.json")) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable file" in printed
    rows = [line for line in printed.splitlines() if line.startswith("0000")]
    assert [row.split()[0] for row in rows] == [f"{i:06d}.jpg" for i in range(len(PICTURE_SIZES))]
    records = json.loads((tmp_path / "all.json").read_text())
    assert records and {r["name"] for r in records} <= set(NAMES)
    assert any(name in printed for name in NAMES)
    pictures = sorted(p.name for p in tmp_path.glob("*.jpg"))
    assert pictures == [f"{i:06d}.jpg" for i in range(len(PICTURE_SIZES))]


@pytest.mark.parametrize("problem", ["missing", "empty folder", "unreadable", "overwrite"])
def test_bad_input_exits_with_code_2_and_a_message_naming_it(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    output = tmp_path / "out"
    if problem == "missing":
        source = tmp_path / "no_such_folder"
    elif problem == "empty folder":
        source = tmp_path / "empty"
        source.mkdir()
    elif problem == "unreadable":
        source = tmp_path / "broken.jpg"
        source.write_bytes(b"this is not a jpeg")
    else:
        source = tmp_path / "photo.jpg"
        Image.new("RGB", (40, 30)).save(source)
        output = tmp_path
    code = predict_cli.main(_arguments(setup, source, output))
    assert code == 2
    assert str(source) in capsys.readouterr().err


def test_a_video_without_opencv_exits_2_naming_the_video_extra(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    code = predict_cli.main(_arguments(setup, clip, tmp_path / "o"))
    assert code == 2
    assert "dfine[video]" in capsys.readouterr().err


def test_a_video_gives_an_annotated_mp4_and_one_json_entry_set_per_frame(setup: dict, tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (120, 80))
    frame = np.asarray(Image.open(setup["images"] / "000000.jpg"))[:, :, ::-1].copy()
    for _ in range(3):
        writer.write(frame)
    writer.release()
    output = tmp_path / "o"
    code = predict_cli.main(_arguments(setup, clip, output, "--threshold", str(THRESHOLD)))
    assert code == 0
    capture = cv2.VideoCapture(str(tmp_path / "o" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert {r["frame"] for r in records} <= {0, 1, 2} and {r["file_name"] for r in records} <= {"clip.mp4"}


def test_class_names_come_from_label_map_then_coco_then_dataset_then_numbers(tmp_path: Path) -> None:
    entries = [{"label": 0, "category_id": 7, "name": "cat"}, {"label": 1, "category_id": 9, "name": "dog"}]
    table = resolve_class_table({"num_classes": 80, "remap_mscoco_category": True}, {"label_map": entries})
    assert (table.names, table.category_ids) == (["cat", "dog"], [7, 9])
    coco = resolve_class_table({"num_classes": 80, "remap_mscoco_category": True}, {})
    assert (coco.names[0], coco.category_ids[0], coco.names[-1], coco.category_ids[-1]) == (
        "person",
        1,
        "toothbrush",
        90,
    )
    quickstart = resolve_class_table(dfine.load_config(CONFIG), {})
    assert quickstart.names == ["circle", "square", "triangle", "star"]
    assert quickstart.category_ids == [1, 2, 3, 4]
    missing = {"type": "CocoDetection", "img_folder": str(tmp_path), "ann_file": str(tmp_path / "none.json")}
    numbers = resolve_class_table({"num_classes": 3, "val_dataloader": {"dataset": missing}}, None)
    assert (numbers.names, numbers.category_ids) == (["class 0", "class 1", "class 2"], [0, 1, 2])


def test_coco_names_line_up_with_the_postprocessor_remap_ids() -> None:
    # official ids from instances_val2017.json, chosen around the 10 unused ids
    official = {"traffic light": 10, "stop sign": 13, "backpack": 27, "dining table": 67, "toothbrush": 90}
    assert len(COCO_NAMES) == len(COCO80_TO_COCO91) == 80
    assert {name: COCO80_TO_COCO91[COCO_NAMES.index(name)] for name in official} == official


def test_draw_detections_changes_pixels_on_boxes_and_handles_no_boxes_and_boxes_outside() -> None:
    image = torch.full((3, 64, 80), 128, dtype=torch.uint8)
    no_labels = torch.zeros(0, dtype=torch.int64)
    empty = draw_detections(image, torch.zeros(0, 4), no_labels, torch.zeros(0), NAMES)
    assert torch.equal(empty, image)
    boxes = torch.tensor([[10.0, 12.0, 40.0, 50.0], [-20.0, -5.0, 30.0, 20.0], [60.0, 40.0, 500.0, 300.0]])
    bad = torch.tensor([[5.0, 5.0, 1.0, 9.0], [float("nan"), 0.0, 4.0, 4.0], [100.0, 100.0, 120.0, 130.0]])
    drawn = draw_detections(
        image,
        torch.cat([boxes, bad]),
        torch.tensor([0, 1, 3, 2, 2, 2]),
        torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
        NAMES,
        ground_truth=(torch.tensor([[45.0, 2.0, 78.0, 35.0]]), torch.tensor([1])),
    )
    assert drawn.shape == image.shape and drawn.dtype == torch.uint8
    assert torch.equal(image, torch.full((3, 64, 80), 128, dtype=torch.uint8)), "input must stay unchanged"
    assert not torch.equal(drawn[:, 30, 10], image[:, 30, 10]), "left edge of the first box"
    assert not torch.equal(drawn[:, 63, 70], image[:, 63, 70]), "box clipped to the bottom-right corner"
    assert torch.equal(drawn[:, 30, 45], torch.full((3,), 255, dtype=torch.uint8)), "white ground-truth edge"
    assert torch.equal(drawn[:, 45, 25], image[:, 45, 25]), "inside of a box stays untouched"
    outside = draw_detections(image, bad, torch.tensor([2, 2, 2]), torch.tensor([0.6, 0.5, 0.4]), NAMES)
    assert torch.equal(outside, image), "inverted, non-finite and wholly outside boxes draw nothing"
