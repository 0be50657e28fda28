"""ONNX export (``dfine.deploy.onnx_export``, ``export_check``, ``dfine-export``) on a tiny 64-pixel model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import CONFIG, TINY_MODEL

import dfine
from dfine.cli import export as export_cli
from dfine.deploy.export_check import (
    TIMING_BLOCK,
    benchmark_onnx,
    benchmark_runtimes,
    check_onnx_parity,
    repeat_to_batch,
)
from dfine.deploy.onnx_export import (
    DETECTION_OUTPUTS,
    RAW_OUTPUTS,
    ExportableDetector,
    baked_batch_dimension,
    export_onnx,
    graph_op_types,
    make_session,
    require_onnx,
    simplify_onnx,
)
from dfine.models.realistic_weights import random_images, realistic_state_dict

onnx = pytest.importorskip(
    "onnx", reason='onnx is not installed (pip install -e ".[export]"; CI installs it)'
)
onnxruntime = pytest.importorskip(
    "onnxruntime", reason='onnxruntime is not installed (pip install -e ".[export]"; CI installs it)'
)

SIZE = 64
TINY = [f"eval_spatial_size=[{SIZE}, {SIZE}]", *TINY_MODEL]
# Original images of several sizes, so box scaling and the size input are exercised.
ORIGINAL_SIZES = torch.tensor([[640, 480], [64, 64], [333, 500]], dtype=torch.int64)


def tiny_model(*overrides: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = dfine.load_config(CONFIG, [*TINY, *overrides])
    model = dfine.build_model(cfg)
    model.load_state_dict(realistic_state_dict(model, seed=1))
    return model.eval(), dfine.build_postprocessor(cfg)


def images(batch_size: int, seed: int = 0) -> torch.Tensor:
    return random_images(batch_size, SIZE, SIZE, seed=seed)


@pytest.fixture(scope="module")
def detector() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_model()


@pytest.fixture(scope="module")
def static_file(detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, postprocessor = detector
    return export_onnx(
        model, postprocessor, tmp_path_factory.mktemp("onnx") / "static.onnx", image_size=(64, 64)
    )


@pytest.fixture(scope="module")
def dynamic_file(detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, postprocessor = detector
    path = tmp_path_factory.mktemp("onnx") / "dynamic.onnx"
    return export_onnx(model, postprocessor, path, image_size=(64, 64), dynamic_batch=True)


def test_export_with_postprocessing_matches_pytorch_within_1e_4(detector, static_file: Path) -> None:
    session = make_session(static_file, num_threads=1)
    assert [i.name for i in session.get_inputs()] == ["images", "orig_target_sizes"]
    assert [o.name for o in session.get_outputs()] == list(DETECTION_OUTPUTS)
    reference = ExportableDetector(*detector)
    result = check_onnx_parity(static_file, reference, images(1), ORIGINAL_SIZES[:1], session=session)
    assert result.passed, result.summary()
    assert set(result.max_difference) == {"boxes", "scores"}
    assert max(result.max_difference.values()) <= 1e-4
    labels, boxes, scores = session.run(
        None, {"images": images(1).numpy(), "orig_target_sizes": ORIGINAL_SIZES[:1].numpy()}
    )
    assert labels.dtype == np.int64 and labels.shape == (1, 16 * 4)  # K = Q * C when below 300
    assert boxes.shape == (1, 64, 4) and scores.shape == (1, 64)
    assert np.all(np.diff(scores[0]) <= 0), "scores must come best first"
    # Independently of the traced wrapper: the plain model + postprocessor in PyTorch, so a wrapper bug (e.g.
    # width and height swapped on the way in) cannot hide by being on both sides of the parity check.
    model, postprocessor = detector
    with torch.no_grad():
        [plain] = postprocessor(model(images(1)), ORIGINAL_SIZES[:1].float())
    np.testing.assert_array_equal(labels[0], plain["labels"].numpy())
    np.testing.assert_allclose(boxes[0], plain["boxes"].numpy(), atol=1e-2)
    np.testing.assert_allclose(scores[0], plain["scores"].numpy(), atol=1e-4)


def test_export_leaves_the_callers_model_trainable(detector, static_file: Path) -> None:
    model, _ = detector
    assert not getattr(model.decoder, "deployed", False)
    # deploy() folds BatchNorm and merges branches, which renames and drops state-dict keys
    assert model.state_dict().keys() == tiny_model()[0].state_dict().keys()


def test_dynamic_batch_runs_at_1_2_and_8_with_a_symbolic_batch_dimension(
    detector, dynamic_file: Path
) -> None:
    assert baked_batch_dimension(dynamic_file) == []
    graph = onnx.load(str(dynamic_file)).graph
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    session = make_session(dynamic_file, num_threads=1)
    reference = ExportableDetector(*detector)
    for batch_size in (1, 2, 8):
        batch, sizes = repeat_to_batch(images(3, seed=2), ORIGINAL_SIZES, batch_size)
        result = check_onnx_parity(dynamic_file, reference, batch, sizes, session=session)
        assert result.passed and result.batch_size == batch_size, result.summary()


def test_static_export_bakes_the_batch_dimension_and_is_detected(static_file: Path) -> None:
    # The inputs carry the fixed batch; the exporter gives top-k outputs placeholder names either way.
    assert {"images", "orig_target_sizes"} <= set(baked_batch_dimension(static_file))
    session = make_session(static_file, num_threads=1)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        session.run(None, {"images": images(2).numpy(), "orig_target_sizes": ORIGINAL_SIZES[:2].numpy()})


def test_no_postprocess_exports_raw_logits_and_boxes(detector, tmp_path: Path) -> None:
    model, _ = detector
    path = export_onnx(model, None, tmp_path / "raw.onnx", image_size=(64, 64), dynamic_batch=True)
    session = make_session(path, num_threads=1)
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == list(RAW_OUTPUTS) == ["pred_logits", "pred_boxes"]
    logits, boxes = session.run(None, {"images": images(2).numpy()})
    assert logits.shape == (2, 16, 4) and boxes.shape == (2, 16, 4)
    result = check_onnx_parity(path, ExportableDetector(model, None), images(2), session=session)
    assert result.passed and set(result.max_difference) == set(RAW_OUTPUTS), result.summary()


def test_discrete_sampling_exports_a_graph_without_grid_sample(static_file: Path, tmp_path: Path) -> None:
    assert "GridSample" in graph_op_types(static_file)  # the default method does need it
    model, postprocessor = tiny_model("model.decoder.cross_attn_method=discrete")
    path = export_onnx(model, postprocessor, tmp_path / "discrete.onnx", image_size=(64, 64))
    assert "GridSample" not in graph_op_types(path)
    reference = ExportableDetector(model, postprocessor)
    result = check_onnx_parity(path, reference, images(1, seed=3), ORIGINAL_SIZES[2:])
    assert result.passed, result.summary()


def test_exported_stem_keeps_the_max_pool_that_eager_deploy_replaces(static_file: Path) -> None:
    # Eager deploy() pools with two elementwise maxima (faster in PyTorch); in OpenVINO the Slice nodes of
    # that form were slower than its MaxPool, so the export keeps the pool.
    assert "MaxPool" in graph_op_types(static_file)


class _FakeSession:
    """Stands in for onnxruntime: returns fixed outputs, to test the comparison itself."""

    def __init__(self, outputs: list[np.ndarray]) -> None:
        self.outputs = outputs

    def get_inputs(self):  # type: ignore[no-untyped-def]
        return [type("Input", (), {"name": name}) for name in ("images", "orig_target_sizes")]

    def get_outputs(self):  # type: ignore[no-untyped-def]
        return [type("Output", (), {"name": name}) for name in DETECTION_OUTPUTS]

    def run(self, names, feed):  # type: ignore[no-untyped-def]
        return self.outputs


class _FixedDetector(torch.nn.Module):
    def __init__(self, outputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, images, sizes):  # type: ignore[no-untyped-def]
        return self.outputs


def _detections() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.tensor([[2, 0, 1, 3]])
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 60, 30], [1, 2, 3, 4]]])
    scores = torch.tensor([[0.9, 0.80000, 0.799999, 0.1]])
    return labels, boxes, scores


def _compare(ours: list[np.ndarray]):  # type: ignore[no-untyped-def]
    reference = _FixedDetector(_detections())
    return check_onnx_parity(
        "fake.onnx", reference, images(1), torch.tensor([[64, 64]]), session=_FakeSession(ours)
    )


def test_near_tied_detections_in_swapped_order_still_pass() -> None:
    labels, boxes, scores = (t.numpy().copy() for t in _detections())
    order = [0, 2, 1, 3]  # scores 0.8 and 0.799999 ranked the other way round
    result = _compare([labels[:, order], boxes[:, order], scores[:, order]])
    assert result.passed and result.reordered == 2 and result.mismatched == 0, result.summary()


def test_a_detection_tied_at_the_top_k_cut_off_may_differ() -> None:
    labels, boxes, scores = (t.numpy().copy() for t in _detections())
    labels[0, 3], boxes[0, 3], scores[0, 3] = 0, [7, 7, 9, 9], 0.1 + 1e-6
    result = _compare([labels, boxes, scores])
    assert result.passed and result.at_cutoff == 1, result.summary()


def test_swapped_detections_with_clearly_different_scores_fail() -> None:
    labels, boxes, scores = (t.numpy().copy() for t in _detections())
    scores[0, 1], scores[0, 2] = 0.75, 0.85  # no longer within tolerance of the reference
    result = _compare([labels, boxes, scores])
    assert not result.passed and result.mismatched >= 1


def test_a_box_that_differs_fails_with_its_difference_reported() -> None:
    labels, boxes, scores = (t.numpy().copy() for t in _detections())
    boxes[0, 0] += 1.0  # 1 pixel of a 64-pixel image: 1.6e-2, far above the 1e-4 tolerance
    result = _compare([labels, boxes, scores])
    assert not result.passed and result.max_difference["boxes"] == pytest.approx(1 / 64)
    assert result.max_difference["scores"] == 0.0


def test_a_label_that_differs_fails_even_with_identical_scores() -> None:
    labels, boxes, scores = (t.numpy().copy() for t in _detections())
    labels[0, 0] = 1
    assert not _compare([labels, boxes, scores]).passed


def test_benchmark_reports_model_and_end_to_end_latency(static_file: Path) -> None:
    feed = {"images": images(1).numpy(), "orig_target_sizes": ORIGINAL_SIZES[:1].numpy()}
    calls = []
    timings = benchmark_onnx(
        static_file, feed, preprocess=lambda: calls.append(1) or feed, warmup=1, iterations=3, num_threads=1
    )
    # warm-up, the block's untimed first call, 3 timed calls
    assert set(timings) == {"model", "end_to_end"} and len(calls) == 1 + 1 + 3
    assert all(stats.median_ms > 0 and stats.iterations == 3 for stats in timings.values())


def test_missing_onnxruntime_names_the_export_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[export\]"'):
        require_onnx()


def test_simplify_without_onnxsim_leaves_the_file_and_says_so(
    static_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    before = static_file.read_bytes()
    assert simplify_onnx(static_file) is False
    assert static_file.read_bytes() == before
    assert "pip install onnxsim" in caplog.text


def test_simplify_with_onnxsim_shrinks_the_graph_and_keeps_parity(
    detector, dynamic_file: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxsim", reason="onnxsim is not installed (pip install onnxsim)")
    path = tmp_path / "simplified.onnx"
    path.write_bytes(dynamic_file.read_bytes())
    nodes_before = len(onnx.load(str(path)).graph.node)
    assert simplify_onnx(path) is True
    assert len(onnx.load(str(path)).graph.node) < nodes_before
    assert baked_batch_dimension(path) == [], "simplifying must keep the batch dynamic"
    reference = ExportableDetector(*detector)
    for batch in (1, 3):
        result = check_onnx_parity(path, reference, images(batch), ORIGINAL_SIZES[:batch])
        assert result.passed and max(result.max_difference.values()) <= 1e-4, result.summary()


# -- dfine-export -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _cli(checkpoint: Path, data_root: Path, *flags: str) -> list[str]:
    overrides = [
        *TINY,
        f"val_dataloader.dataset.root={data_root}",
        "val_dataloader.dataset.num_images=3",
        "val_dataloader.num_workers=0",
        f"val_dataloader.dataset.transforms.ops=[{{type: Resize, size: [{SIZE}, {SIZE}]}}, "
        "{type: ConvertPILImage, dtype: float32, scale: true}]",
    ]
    return ["-c", str(CONFIG), "-r", str(checkpoint), "--threads", "1", *flags, "-u", *overrides]


def test_cli_exports_checks_batches_1_2_8_and_benchmarks(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "model.onnx"
    argv = _cli(checkpoint, tmp_path / "data", "-o", str(output), "--dynamic-batch", "--benchmark")
    assert export_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert output.is_file() and baked_batch_dimension(output) == []
    for batch_size in (1, 2, 8):
        assert f"batch {batch_size}: boxes" in printed and "-> ok" in printed
    assert "end to end (preprocess + model + postprocess): median" in printed
    assert "model only" in printed


def test_cli_exits_1_when_onnxruntime_differs_beyond_tolerance(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = onnxruntime.InferenceSession.run

    def drifting(self, names, feed, *args, **kwargs):  # type: ignore[no-untyped-def]
        outputs = run(self, names, feed, *args, **kwargs)
        return [o + np.float32(1e-3) if o.dtype == np.float32 else o for o in outputs]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", drifting)
    argv = _cli(checkpoint, tmp_path / "data", "-o", str(tmp_path / "m.onnx"), "--random-inputs")
    assert export_cli.main(argv) == 1
    printed = capsys.readouterr().out
    assert "ABOVE TOLERANCE" in printed
    assert "batch dimension is fixed to 1" in printed  # the static export's baked batch is reported


def test_cli_without_a_readable_dataset_suggests_random_inputs(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"{{type: CocoDetection, img_folder: {tmp_path}/none, ann_file: {tmp_path}/none.json}}"
    argv = [
        *_cli(checkpoint, tmp_path / "data", "-o", str(tmp_path / "m.onnx")),
        f"val_dataloader.dataset={missing}",
    ]
    assert export_cli.main(argv) == 2
    assert "--random-inputs" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_runtimes_are_timed_in_turn_in_blocks_each_after_an_untimed_call() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    timings = benchmark_runtimes(calls, batch_size=2, warmup=1, iterations=TIMING_BLOCK + 2)
    assert [stats.iterations for stats in timings.values()] == [TIMING_BLOCK + 2] * 2
    # warm-up in turn, then per block one untimed call and up to TIMING_BLOCK timed ones, a before b
    block, rest = ["a"] * (TIMING_BLOCK + 1) + ["b"] * (TIMING_BLOCK + 1), ["a"] * 3 + ["b"] * 3
    assert order == ["a", "b", *block, *rest]
