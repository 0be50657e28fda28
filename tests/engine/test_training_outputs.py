"""What a training run leaves behind for a person: metrics.jsonl, TensorBoard, results.png, curves, pictures,
eval.json; early stopping; Ctrl-C; and the quickstart config itself. Tiny quickstart config, CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from trainer_helpers import CONFIG, tiny_config

import dfine
from dfine.checkpoint import load_checkpoint
from dfine.engine import reports as reports_module
from dfine.engine.setup import build_training
from dfine.engine.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Any]:
    """A 2-epoch run with every report on; its folder and the trainer's own history."""
    output_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(build_training(tiny_config(output_dir, data_root)))
    trainer.fit()
    return {"dir": output_dir, "history": trainer.state.history, "best_ap": trainer.state.best_ap}


def _scalars(summary_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(summary_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_metrics_jsonl_has_one_line_per_epoch_with_the_epochs_losses_and_ap(run: dict[str, Any]) -> None:
    lines = (run["dir"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1]
    for record, kept in zip(records, run["history"], strict=True):
        assert record["loss"] == pytest.approx(kept["loss"])
        assert record["loss_vfl"] == pytest.approx(kept["loss_vfl"])
        assert record["val_AP"] == pytest.approx(kept["val_AP"])
        assert record["images_per_s"] > 0 and record["memory_mb"] > 0


def test_eval_json_holds_the_last_epochs_metrics(run: dict[str, Any]) -> None:
    written = json.loads((run["dir"] / "eval.json").read_text())
    assert written["epoch"] == 1
    assert written["AP"] == pytest.approx(run["history"][-1]["val_AP"])
    assert written["AP50"] == pytest.approx(run["history"][-1]["val_AP50"])


def test_tensorboard_has_step_losses_lr_per_group_and_epoch_ap(run: dict[str, Any]) -> None:
    scalars = _scalars(run["dir"] / "summary")
    assert {"train/loss_vfl", "train/loss_giou", "train/images_per_s", "lr/group_0", "lr/group_3"} <= set(
        scalars
    )
    assert [step for step, _ in scalars["val/AP"]] == [0, 1]
    assert [value for _, value in scalars["val/AP"]] == pytest.approx([r["val_AP"] for r in run["history"]])
    assert [value for _, value in scalars["epoch/loss"]] == pytest.approx([r["loss"] for r in run["history"]])
    # 2 steps per epoch with print_freq 1: one point per optimizer step
    assert [step for step, _ in scalars["train/loss_vfl"]] == [1, 2, 3, 4]


def test_results_png_curves_and_validation_pictures_are_written(run: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib", reason="the plots are the [plots] extra")
    for name in ("results.png", "pr_curve.png", "f1_curve.png", "val_predictions.jpg"):
        with Image.open(run["dir"] / name) as picture:
            assert picture.width > 100 and picture.height > 100, name
    assert "val_best_f1" in run["history"][-1] and 0.0 <= run["history"][-1]["val_f1_threshold"] <= 1.0


def test_validation_pictures_reach_tensorboard(run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run["dir"] / "summary"), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["images"]
    assert "val_predictions/0" in tags
    assert [event.step for event in accumulator.Images("val_predictions/0")] == [0, 1]


def test_without_matplotlib_the_run_finishes_and_says_what_it_skipped(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dfine.engine import plots

    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="dfine"):
        Trainer(build_training(tiny_config(tmp_path, data_root, epochs=1))).fit()
    assert not (tmp_path / "results.png").exists()
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "val_predictions.jpg").is_file()
    assert any(
        "skipped results.png" in r.getMessage() and ".[plots]" in r.getMessage() for r in caplog.records
    )


def _scripted_ap(trainer: Trainer, values: list[float]) -> None:
    """Replace evaluation with a fixed AP sequence, so the early-stopping rule is what is tested."""
    sequence = iter(values)

    def evaluate() -> dict[str, Any]:
        return {"AP": next(sequence), "AP50": 0.0}

    trainer.evaluate = evaluate  # type: ignore[method-assign]
    trainer.report.enabled = False


def test_patience_stops_after_that_many_evaluations_without_a_new_best(
    data_root: Path, tmp_path: Path
) -> None:
    trainer = Trainer(build_training(tiny_config(tmp_path, data_root, "patience=2", epochs=8)))
    _scripted_ap(trainer, [0.1, 0.3, 0.2, 0.25, 0.9, 0.9, 0.9, 0.9])
    result = trainer.fit()
    # best at epoch 1; epochs 2 and 3 bring no gain -> stop after epoch 3 (epoch 4's 0.9 is never reached)
    assert [r["epoch"] for r in trainer.state.history] == [0, 1, 2, 3]
    assert result["best_epoch"] == 1 and result["best_ap"] == pytest.approx(0.3)
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 4


def test_without_patience_the_same_sequence_runs_every_epoch(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(build_training(tiny_config(tmp_path, data_root, epochs=5)))
    _scripted_ap(trainer, [0.1, 0.3, 0.2, 0.25, 0.9])
    assert trainer.fit()["best_epoch"] == 4
    assert len(trainer.state.history) == 5


def test_ctrl_c_saves_last_pth_with_the_weights_so_far_and_resume_redoes_that_epoch(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path, data_root, epochs=3)
    trainer = Trainer(build_training(cfg))
    real_backward = trainer.step.backward

    def interrupting_backward(images, targets, index, sync=True):  # type: ignore[no-untyped-def]
        if trainer.state.epoch == 1 and index == 1:
            raise KeyboardInterrupt
        return real_backward(images, targets, index, sync=sync)

    trainer.step.backward = interrupting_backward  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "last.pth")
    # epoch 1 ran one of its 2 steps: the weights after it are saved, the epoch counts as not done
    assert saved["epoch"] == 1 and saved["interrupted"] == {"epoch": 1, "global_step": 3}
    assert saved["global_step"] == 2
    assert saved["lr_schedule"]["global_step"] == 2, "the schedule must rewind to the epoch's start"
    for key, value in trainer.run.model.state_dict().items():
        assert torch.equal(saved["model"][key], value), key
    # a line the checkpoint never saw (as from a crash after writing it): the resumed run must drop it
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({"epoch": 1, "stale": True}) + "\n")

    resumed = Trainer(build_training(cfg, resume="auto"))
    assert resumed.state.epoch == 1 and resumed.state.global_step == 2
    assert resumed.run.lr_schedule.global_step == 2
    resumed.fit()
    assert [r["epoch"] for r in resumed.state.history] == [0, 1, 2]
    # each epoch's steps exactly once
    assert resumed.state.global_step == resumed.run.lr_schedule.global_step == 6
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert not any("stale" in line for line in lines)


def test_ctrl_c_through_dfine_train_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    from dfine.cli import train as train_cli

    def interrupted(argv):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "_main", interrupted)
    assert train_cli.main(["-c", str(CONFIG)]) == 130


def test_quickstart_config_is_the_cpu_recipe_and_its_dataset_generates(tmp_path: Path) -> None:
    cfg = dfine.load_config(
        CONFIG,
        [
            f"train_dataloader.dataset.root={tmp_path}",
            f"val_dataloader.dataset.root={tmp_path}",
            "train_dataloader.dataset.num_images=8",
            "val_dataloader.dataset.num_images=4",
        ],
    )
    assert cfg["eval_spatial_size"] == [320, 320] and cfg["num_classes"] == 4
    assert cfg["model"]["backbone"]["name"] == "B0"
    assert not cfg["model"]["backbone"].get("pretrained")
    assert cfg["epochs"] * 800 // cfg["train_dataloader"]["total_batch_size"] <= 1000  # CPU-sized
    from dfine.data import build_dataloader

    loader = build_dataloader(cfg["train_dataloader"], split="train", num_classes=4)
    build_dataloader(cfg["val_dataloader"], split="val", num_classes=4)
    images, targets = next(iter(loader))
    assert images.shape[0] == cfg["train_dataloader"]["total_batch_size"] and images.shape[1] == 3
    assert all(int(t["labels"].max()) < 4 for t in targets if len(t["labels"]))
    generated = [p for p in tmp_path.rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(generated) == 12  # 8 train + 4 val images


def test_validation_pictures_draw_ground_truth_and_detections(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, data_root, epochs=1)
    run = build_training(cfg)
    drawn: list[dict[str, Any]] = []
    real_draw = __import__("dfine.inference.drawing", fromlist=["draw_detections"]).draw_detections

    def recording_draw(image, boxes, labels, scores, class_names, ground_truth=None):  # type: ignore[no-untyped-def]
        drawn.append({"boxes": boxes, "scores": scores, "truth": ground_truth, "names": class_names})
        return real_draw(image, boxes, labels, scores, class_names, ground_truth=ground_truth)

    monkeypatch.setattr("dfine.inference.drawing.draw_detections", recording_draw)
    dataset = run.val_loader.dataset
    pictures = reports_module.validation_pictures(
        run.model, run.postprocessor, dataset, [0, 1], run.device, ["a", "b", "c", "d"], 0.0
    )
    assert len(pictures) == 2 and pictures[0].dtype == torch.uint8
    assert len(drawn) == 2, "every picture goes through draw_detections"
    for index, call in enumerate(drawn):
        _, target = dataset[index]
        truth_boxes, truth_labels = call["truth"]
        assert torch.equal(truth_labels, target["labels"])
        height, width = pictures[index].shape[-2:]
        cx, cy, w, h = target["boxes"].unbind(-1)  # normalised cxcywh
        expected = torch.stack(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1
        )
        torch.testing.assert_close(truth_boxes, expected)
        assert len(call["boxes"]) > 0  # threshold 0 keeps every detection
