"""``dfine-train`` / ``dfine-eval`` end to end through the installed console scripts, on a tiny config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from trainer_helpers import CONFIG, tiny_overrides

import dfine
from dfine.cli import eval as eval_cli
from dfine.cli import train as train_cli
from dfine.engine.signals import EXIT_PREEMPTED, StopRequested

METRIC_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}


def _script(name: str) -> str:
    """The console script installed beside this interpreter (falls back to PATH)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # One intra-op thread: two spinning threads on a shared 2-core machine are many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 1-epoch ``dfine-train`` run; its output folder and the ``-u`` overrides it used."""
    root = tmp_path_factory.mktemp("cli")
    overrides = tiny_overrides(root / "run", root / "data", epochs=1)
    result = _run([_script("dfine-train"), "-c", str(CONFIG), "-u", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", overrides


def test_dfine_train_writes_checkpoints_eval_json_and_the_resolved_config(
    trained: tuple[Path, list[str]],
) -> None:
    output_dir, _ = trained
    for name in ("last.pth", "best.pth", "config.yml", "eval.json"):
        assert (output_dir / name).is_file(), name
    metrics = json.loads((output_dir / "eval.json").read_text())
    assert metrics.keys() >= METRIC_KEYS
    saved = yaml.safe_load((output_dir / "config.yml").read_text())
    assert saved["epochs"] == 1 and saved["model"]["decoder"]["num_queries"] == 16
    checkpoint = torch.load(output_dir / "last.pth", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2


def test_dfine_eval_writes_metric_json_and_coco_predictions(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    output_dir, overrides = trained
    metrics_path, predictions_path = tmp_path / "out.json", tmp_path / "p.json"
    result = _run(
        [
            _script("dfine-eval"),
            "-c",
            str(CONFIG),
            "-r",
            str(output_dir / "best.pth"),
            "--json",
            str(metrics_path),
            "--save-predictions",
            str(predictions_path),
            "-u",
            *overrides,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(metrics_path.read_text())
    assert set(metrics) == METRIC_KEYS
    assert all(0.0 <= value <= 1.0 or value == -1.0 for value in metrics.values())
    training_metrics = json.loads((output_dir / "eval.json").read_text())
    assert metrics["AP"] == pytest.approx(training_metrics["AP"], abs=1e-6), "best.pth is what was scored"
    predictions = json.loads(predictions_path.read_text())
    assert predictions, "the model made no detections at all"
    assert {"image_id", "category_id", "bbox", "score"} <= predictions[0].keys()
    assert {p["category_id"] for p in predictions} <= {1, 2, 3, 4}


def test_dfine_eval_predictions_scores_a_results_file_like_the_model_run(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    output_dir, overrides = trained
    predictions_path, metrics_path = tmp_path / "p.json", tmp_path / "out.json"
    common = ["-c", str(CONFIG), "-u", *overrides]
    code = eval_cli.main(
        [*common, "-r", str(output_dir / "best.pth"), "--save-predictions", str(predictions_path)]
    )
    assert code == 0
    code = eval_cli.main([*common, "--predictions", str(predictions_path), "--json", str(metrics_path)])
    assert code == 0
    rescored = json.loads(metrics_path.read_text())
    training_metrics = json.loads((output_dir / "eval.json").read_text())
    assert rescored["AP"] == pytest.approx(training_metrics["AP"], abs=1e-6)


def test_print_config_prints_yaml_that_loads_back_equal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides(tmp_path / "run", tmp_path / "data")
    assert train_cli.main(["-c", str(CONFIG), "--print-config", "-u", *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = dfine.load_config(CONFIG, overrides).to_dict()
    assert printed == expected
    saved = tmp_path / "printed.yml"
    saved.write_text(yaml.safe_dump(printed))
    assert dfine.load_config(saved).to_dict() == expected


def test_a_misspelt_key_exits_with_code_2_and_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    code = train_cli.main(["-c", str(CONFIG), "--print-config", "-u", "model.decoder.num_querys=10"])
    assert code == 2
    error = capsys.readouterr().err
    assert "num_querys" in error and "num_queries" in error


def test_resume_from_a_weights_only_file_exits_with_code_2_suggesting_tune(
    trained: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output_dir, overrides = trained
    weights = tmp_path / "weights.pth"
    checkpoint = torch.load(output_dir / "last.pth", weights_only=True, map_location="cpu")
    torch.save({"model": checkpoint["model"]}, weights)
    arguments = ["-c", str(CONFIG), "-r", str(weights), "-u", *overrides, f"output_dir={tmp_path}"]
    code = train_cli.main(arguments)
    assert code == 2
    assert f"-t {weights}" in capsys.readouterr().err


def test_a_bug_inside_a_constructor_leaves_dfine_train_with_its_traceback_not_a_config_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dfine.config.registry import MODELS

    class BrokenPostProcessor:
        def __init__(self, num_classes: int, use_focal_loss: bool, remap_mscoco_category: bool) -> None:
            self.scores = [1.0] * num_classes
            _ = self.scores[num_classes]  # the bug: an IndexError, not a mistake in the config

    MODELS.register("BrokenPostProcessorForTest")(BrokenPostProcessor)
    try:
        overrides = tiny_overrides(tmp_path / "run", tmp_path / "data", epochs=1)
        arguments = ["-c", str(CONFIG), "-u", *overrides, "postprocessor={type: BrokenPostProcessorForTest}"]
        with pytest.raises(IndexError) as error:
            train_cli.main(arguments)
    finally:
        del MODELS._entries["BrokenPostProcessorForTest"]
    frames = [entry.name for entry in error.traceback]
    assert "__init__" in frames, "the constructor's frame must be in the traceback"
    assert "error:" not in capsys.readouterr().err, "a bug must not be reported as a user mistake"


@pytest.mark.parametrize(
    ("outcome", "code", "left"),
    [("done", 0, True), ("preempted", EXIT_PREEMPTED, True), ("crashed", None, False)],
)
def test_dfine_train_leaves_the_process_group_after_a_finished_or_preempted_run_only(
    outcome: str,
    code: int | None,
    left: bool,
    monkeypatch: pytest.MonkeyPatch,
    data_root: Path,
    tmp_path: Path,
) -> None:
    # A gloo group left to the interpreter's exit can abort it, so a finished torchrun job reported failure.
    # After another error a rank must not leave: the others may be waiting for it inside a collective.
    from dfine.engine.trainer import Trainer

    calls: list[str] = []
    monkeypatch.setattr(dfine.distributed, "cleanup", lambda: calls.append("cleanup"))

    def fit(self: Trainer) -> dict:
        if outcome == "preempted":
            raise StopRequested("SIGTERM", "last.pth")
        if outcome == "crashed":
            raise RuntimeError("a bug")
        return {"best_ap": 0.0, "best_epoch": -1}

    monkeypatch.setattr(Trainer, "fit", fit)
    argv = ["-c", str(CONFIG), "-u", *tiny_overrides(tmp_path / "run", data_root, epochs=1)]
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            train_cli.main(argv)
    else:
        assert train_cli.main(argv) == code
    assert calls == (["cleanup"] if left else [])
