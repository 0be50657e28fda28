"""HF folders from tools/convert_weights.py run HF's documented snippet, and read back as checkpoints.

A tiny quickstart model with noisy weights and a class head biased towards "beta" (so detections clear the
snippet's threshold 0.5) is saved as a dfine-train checkpoint with a label map, converted by the tool, and the
snippet of HF's D-FINE page is run verbatim on a picture (offline): its names must be the label map's and its
boxes and scores `Predictor`'s. The other way round, the folder is given to Predictor / dfine-eval directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch
from trainer_helpers import CONFIG, SIZE, tiny_overrides

import dfine
from dfine.checkpoint import CheckpointError, load_checkpoint
from dfine.cli import eval as eval_cli
from dfine.data.synthetic import generate_split
from dfine.hf.folder import processor_settings
from dfine.inference.predictor import Predictor

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["alpha", "beta", "gamma", "delta"]
CATEGORY_IDS = [1, 2, 3, 4]  # the quickstart set's ids: dfine-eval scores the folder against it
SNIPPET = """
import torch
from transformers import DFineForObjectDetection, RTDetrImageProcessor
from PIL import Image

image = Image.open(picture)
image_processor = RTDetrImageProcessor.from_pretrained(folder, local_files_only=True)
model = DFineForObjectDetection.from_pretrained(folder, local_files_only=True)

inputs = image_processor(images=image, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)

results = image_processor.post_process_object_detection(
    outputs, target_sizes=torch.tensor([image.size[::-1]]), threshold=0.5
)
for result in results:
    for score, label_id, box in zip(result["scores"], result["labels"], result["boxes"]):
        score, label = score.item(), label_id.item()
        box = [round(i, 2) for i in box.tolist()]
        print(f"{model.config.id2label[label]}: {score:.2f} {box}")
"""


def _tool():
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hf_folder")
    overrides = tiny_overrides(root / "run", root / "data")
    cfg = dfine.load_config(CONFIG, overrides)
    torch.manual_seed(0)
    model = dfine.build_model(cfg)
    # not the shared W(n) constants (up, reg_scale), not buffers (BatchNorm variances stay > 0)
    parameters = {
        name for name, _ in model.named_parameters() if name.rpartition(".")[2] not in ("up", "reg_scale")
    }
    state = {
        key: value + 0.2 * torch.randn_like(value) if key in parameters else value
        for key, value in model.state_dict().items()
    }
    for key in state:
        if re.fullmatch(r"decoder\.dec_score_head\.\d+\.bias", key):
            state[key] = state[key] + torch.tensor([0.0, 10.0, 0.0, 0.0])  # "beta" scores above 0.5
    label_map = [
        {"label": i, "category_id": c, "name": n}
        for i, (c, n) in enumerate(zip(CATEGORY_IDS, NAMES, strict=True))
    ]
    checkpoint = root / "best.pth"
    torch.save({"ema": {"module": state}, "model": state, "label_map": label_map}, checkpoint)
    folder = root / "hf"
    arguments = ["-c", str(CONFIG), "-i", str(checkpoint), "-o", str(folder), "-u", *overrides]
    assert _tool().main(arguments) == 0
    generate_split(root / "pictures", "val", 1, image_size=150)
    picture = next((root / "pictures" / "images").iterdir())
    return {
        "cfg": cfg,
        "checkpoint": checkpoint,
        "folder": folder,
        "picture": picture,
        "overrides": overrides,
    }


def _predict(converted: dict, weights: Path) -> list:
    return Predictor(converted["cfg"], weights, threshold=0.5).predict([converted["picture"]])


def test_documented_snippet_prints_label_map_names_and_predictor_boxes(converted: dict) -> None:
    assert (converted["folder"] / "preprocessor_config.json").is_file()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(SNIPPET, {"folder": str(converted["folder"]), "picture": str(converted["picture"])})
    lines = printed.getvalue().splitlines()
    expected = Predictor(converted["cfg"], converted["checkpoint"], threshold=0.5).predict(
        [converted["picture"]]
    )
    assert len(lines) == len(expected[0]) > 0
    for line, name, score, box in zip(
        lines, expected[0].names, expected[0].scores.tolist(), expected[0].boxes.tolist(), strict=True
    ):
        printed_name, rest = line.split(": ", 1)
        printed_score, printed_box = rest.split(" ", 1)
        assert printed_name == name and name in NAMES and not name.startswith("LABEL_")
        assert abs(float(printed_score) - score) <= 0.011
        assert torch.allclose(torch.tensor(json.loads(printed_box)), torch.tensor(box), atol=0.6)


def test_folder_reads_back_as_the_checkpoint_with_its_label_map(converted: dict) -> None:
    from_folder = load_checkpoint(converted["folder"], cfg=converted["cfg"])
    original = torch.load(converted["checkpoint"], weights_only=True)
    assert from_folder["label_map"] == original["label_map"]
    assert set(from_folder["model"]) == set(original["model"])
    assert all(torch.equal(from_folder["model"][k], v) for k, v in original["model"].items())
    by_folder = Predictor(converted["cfg"], converted["folder"], threshold=0.5).predict(
        [converted["picture"]]
    )
    by_file = Predictor(converted["cfg"], converted["checkpoint"], threshold=0.5).predict(
        [converted["picture"]]
    )
    assert by_folder[0].names == by_file[0].names
    assert torch.equal(by_folder[0].boxes, by_file[0].boxes)


def test_dfine_eval_accepts_the_folder(converted: dict, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    arguments = ["-c", str(CONFIG), "-r", str(converted["folder"]), "--json", str(out)]
    assert eval_cli.main([*arguments, "-u", *converted["overrides"]]) == 0
    assert "AP" in json.loads(out.read_text())


def test_folder_of_another_architecture_names_its_config(converted: dict, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rt_detr", "architectures": ["RTDetr"]}))
    with pytest.raises(CheckpointError, match=r"config\.json describes a 'rt_detr' model"):
        load_checkpoint(tmp_path, cfg=converted["cfg"])
    with pytest.raises(CheckpointError, match=r"without config\.json"):
        load_checkpoint(tmp_path / "..", cfg=converted["cfg"])


def test_folder_of_another_size_is_refused(converted: dict) -> None:
    wider = dfine.load_config(CONFIG, [*converted["overrides"], "model.decoder.hidden_dim=64"])
    with pytest.raises(CheckpointError, match=r"do not fit|not part of"):
        load_checkpoint(converted["folder"], cfg=wider)


def test_letterbox_has_no_processor_and_says_why(converted: dict) -> None:
    ops = "[{type: Resize, size: [96, 96], keep_ratio: true}, {type: ConvertPILImage}]"
    cfg = dfine.load_config(CONFIG, [*converted["overrides"], f"val_dataloader.dataset.transforms.ops={ops}"])
    with pytest.raises(ValueError, match="cannot express a letterbox"):
        processor_settings(cfg)
    assert processor_settings(converted["cfg"])["size"] == {"height": SIZE, "width": SIZE}


def test_fine_tuning_from_the_folder_with_other_classes_loads_what_fits(converted: dict) -> None:
    from dfine.checkpoint import load_weights_for_finetune

    six = dfine.load_config(CONFIG, [*converted["overrides"], "num_classes=6"])
    checkpoint = load_checkpoint(converted["folder"], cfg=six)  # the check builds the folder's 4 classes
    assert checkpoint["model"]["decoder.enc_score_head.weight"].shape[0] == 4
    model = dfine.build_model(six)
    load_weights_for_finetune(model, checkpoint)
    backbone = "backbone.stem.stem1.conv.weight"
    assert torch.equal(model.state_dict()[backbone], checkpoint["model"][backbone])
