"""OpenVINO IR export (``dfine.deploy.openvino_export``, ``dfine-export --format openvino``), tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from trainer_helpers import CONFIG, TINY_MODEL

import dfine
from dfine.cli import export as export_cli
from dfine.cli import predict as predict_cli
from dfine.data.synthetic import generate_split
from dfine.deploy.exported_predictor import ExportedPredictor
from dfine.deploy.onnx_export import make_session
from dfine.deploy.openvino_export import OpenVinoSession, label_map_of
from dfine.inference.predictor import Predictor
from dfine.models.realistic_weights import realistic_state_dict

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install -e ".[export]")')
pytest.importorskip("openvino", reason='openvino is not installed (pip install -e ".[openvino]")')

SIZE = 64
TINY = [f"eval_spatial_size=[{SIZE}, {SIZE}]", *TINY_MODEL]
LABEL_MAP = [{"label": i, "category_id": i + 1, "name": n} for i, n in enumerate(["a", "b", "c", "d"])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """dfine-export --format openvino --dynamic-batch --benchmark on a tiny checkpoint; what it printed."""
    root = tmp_path_factory.mktemp("openvino")
    model = dfine.build_model(dfine.load_config(CONFIG, TINY))
    checkpoint = root / "best.pth"
    torch.save({"model": realistic_state_dict(model, seed=1), "label_map": LABEL_MAP}, checkpoint)
    overrides = [
        *TINY,
        f"val_dataloader.dataset.root={root / 'data'}",
        "val_dataloader.dataset.num_images=3",
        "val_dataloader.num_workers=0",
        f"val_dataloader.dataset.transforms.ops=[{{type: Resize, size: [{SIZE}, {SIZE}]}}, "
        "{type: ConvertPILImage, dtype: float32, scale: true}]",
    ]
    output = root / "model.onnx"
    flags = ["--format", "openvino", "--dynamic-batch", "--benchmark", "--iterations", "2", "-o", str(output)]
    argv = ["-c", str(CONFIG), "-r", str(checkpoint), "--threads", "1", *flags, "-u", *overrides]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export_cli.main(argv)
    return {
        "code": code,
        "printed": printed.getvalue(),
        "onnx": output,
        "xml": output.with_suffix(".xml"),
        "checkpoint": checkpoint,
        "cfg": dfine.load_config(CONFIG, overrides),
        "overrides": overrides,
        "root": root,
    }


def test_ir_has_the_onnx_inputs_outputs_and_dynamic_batch(exported: dict) -> None:
    assert exported["code"] == 0, exported["printed"]
    assert exported["xml"].is_file() and exported["xml"].with_suffix(".bin").is_file()
    ov_session, ort_session = OpenVinoSession(exported["xml"]), make_session(exported["onnx"])
    assert [p.name for p in ov_session.get_inputs()] == [p.name for p in ort_session.get_inputs()]
    assert [p.name for p in ov_session.get_outputs()] == ["labels", "boxes", "scores"]
    assert all(port.shape[0] is None for port in ov_session.get_inputs())  # dynamic batch kept
    assert label_map_of(ov_session) == LABEL_MAP == label_map_of(ort_session)


def test_openvino_is_checked_at_batches_1_2_8_and_timed_beside_onnxruntime_and_pytorch(
    exported: dict,
) -> None:
    printed = exported["printed"]
    checked = printed.split("OpenVINO against PyTorch:")[1]
    for batch_size in (1, 2, 8):
        assert f"batch {batch_size}: boxes" in checked
    assert checked.count("-> ok") >= 3
    for batch_size in (1, 8):
        for runtime in ("PyTorch", "onnxruntime", "OpenVINO"):
            assert f"batch {batch_size} {runtime}" in printed


def test_same_outputs_as_onnxruntime_on_one_batch(exported: dict) -> None:
    feed = {
        "images": torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)).numpy(),
        "orig_target_sizes": torch.tensor([[640, 480], [100, 200]]).numpy(),
    }
    ov_out = OpenVinoSession(exported["xml"]).run(None, feed)
    ort_out = make_session(exported["onnx"]).run(None, feed)
    assert (ov_out[0] == ort_out[0]).mean() > 0.9  # labels; near-tied scores may swap order
    assert abs(float(ov_out[2].max()) - float(ort_out[2].max())) < 1e-4


def test_xml_without_its_bin_names_the_missing_file(exported: dict, tmp_path: Path) -> None:
    lonely = tmp_path / "model.xml"
    shutil.copy(exported["xml"], lonely)
    with pytest.raises(FileNotFoundError, match=r"no weights file model\.bin beside it"):
        OpenVinoSession(lonely)


def test_exported_files_predict_what_the_checkpoint_predicts(exported: dict) -> None:
    generate_split(exported["root"] / "pictures", "val", 2, image_size=90)
    pictures = sorted((exported["root"] / "pictures" / "images").iterdir())
    expected = Predictor(exported["cfg"], exported["checkpoint"], threshold=0.2).predict(pictures)
    for path in (exported["onnx"], exported["xml"]):
        found = ExportedPredictor(exported["cfg"], path, threshold=0.2).predict(pictures)
        for ours, reference in zip(found, expected, strict=True):
            assert len(reference) > 0 and ours.names[:3] == reference.names[:3]
            assert ours.names[0] in "abcd"  # the label map stored in the file
            assert torch.allclose(ours.boxes[:3], reference.boxes[:3], atol=1e-2)
            assert torch.allclose(ours.scores[:3], reference.scores[:3], atol=1e-4)


def test_dfine_predict_runs_an_openvino_ir(exported: dict, tmp_path: Path) -> None:
    generate_split(tmp_path / "pictures", "val", 1, image_size=90)
    picture = next((tmp_path / "pictures" / "images").iterdir())
    argv = ["-c", str(CONFIG), "-r", str(exported["xml"]), "--input", str(picture), "--output", str(tmp_path)]
    assert predict_cli.main([*argv, "--threshold", "0.2", "-u", *exported["overrides"]]) == 0
    assert (tmp_path / picture.name).is_file()
    assert json.loads((tmp_path / "predictions.json").read_text())[0]["name"] in "abcd"
