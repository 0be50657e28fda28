"""Two CPU processes under torchrun (gloo) on a tiny config where one rank's batches have no boxes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_overrides

from dfine.data.synthetic import ensure_quickstart

# Builds the run from a config file and overrides, trains, and saves each rank's final weights.
WORKER = """
import sys, torch
import dfine
from dfine.engine.setup import build_training
from dfine.engine.trainer import Trainer
torch.set_num_threads(1)
run = build_training(dfine.load_config(sys.argv[1], sys.argv[3:]))
Trainer(run).fit()
torch.save({"model": run.model.state_dict(), "ema": run.ema.module.state_dict()},
           f"{sys.argv[2]}/rank{run.context.rank}.pt")
dfine.distributed.cleanup()  # as dfine-train does: a gloo group left to the exit can abort it
"""


def _dataset_with_empty_images(tmp_path: Path) -> tuple[Path, Path]:
    """Quickstart's 4 training images with the boxes of images 0 and 2 removed (rank 0's share unshuffled)."""
    folder = ensure_quickstart(tmp_path / "data", split="train", num_images=4)
    coco = json.loads((folder / "annotations.json").read_text())
    empty = {coco["images"][0]["id"], coco["images"][2]["id"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    assert coco["annotations"], "the other rank still needs boxes"
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    return folder / "images", path


@pytest.mark.dist
def test_two_process_run_with_an_empty_batch_on_one_rank_ends_with_identical_weights(tmp_path: Path) -> None:
    images, annotations = _dataset_with_empty_images(tmp_path)
    transforms = (
        "{type: Compose, ops: [{type: Resize, size: [96, 96]}, {type: ConvertPILImage, dtype: float32, "
        "scale: true}, {type: ConvertBoxes, fmt: cxcywh, normalize: true}]}"
    )
    dataset = (
        f"{{type: CocoDetection, img_folder: {images}, ann_file: {annotations}, transforms: {transforms}}}"
    )
    overrides = tiny_overrides(tmp_path / "run", tmp_path / "data", epochs=1)
    overrides = [o for o in overrides if not o.startswith("train_dataloader.dataset.")]
    overrides += [f"train_dataloader.dataset={dataset}", "train_dataloader.shuffle=false", "device=cpu"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(script),
        str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yml"),
        str(tmp_path),
        *overrides,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=False)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun hung (killed after 180 s): {str(error.stderr)[-3000:]}")
    assert result.returncode == 0, result.stderr[-4000:]
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    second = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("model", "ema"):
        differing = [k for k in first[part] if not torch.equal(first[part][k], second[part][k])]
        assert differing == [], f"{part}: ranks disagree on {differing[:5]}"
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_images"] == 2


# Trains, records the per-step losses and the final weights; with EVAL_WEIGHTS set, also evaluates those
# weights (an EMA state dict saved by another run) in this process.
LOSS_WORKER = """
import json, os, sys, torch
import dfine
from dfine.engine.setup import build_training
from dfine.engine.trainer import Trainer
torch.set_num_threads(1)
run = build_training(dfine.load_config(sys.argv[1], sys.argv[3:]))
trainer = Trainer(run)
trainer.fit()
if run.context.rank == 0:
    torch.save({"ema": run.ema.module.state_dict()}, f"{sys.argv[2]}/weights.pt")
    record = {"step_losses": run.state.step_losses, "epoch_losses": [r["loss"] for r in run.state.history]}
    (open(f"{sys.argv[2]}/losses.json", "w")).write(json.dumps(record))
if os.environ.get("EVAL_WEIGHTS"):
    run.ema.module.load_state_dict(torch.load(os.environ["EVAL_WEIGHTS"], weights_only=True)["ema"])
    metrics = trainer.evaluate()
    (open(f"{sys.argv[2]}/metrics.json", "w")).write(json.dumps(metrics))

# A tiny trained model scores AP 0, which would make any gathering bug invisible: an oracle that returns each
# validation image's true boxes, shifted by a per-box amount (IoUs from 1 down), and one false positive.
class Oracle(torch.nn.Module):
    def __init__(self, dataset):
        super().__init__()
        self.truth = {}
        for index in range(len(dataset)):
            image, target = dataset[index]
            self.truth[image.numpy().tobytes()] = (target["boxes"], target["labels"])
    def forward(self, images):
        logits = torch.full((len(images), 8, 4), -10.0)
        boxes = torch.full((len(images), 8, 4), 0.5)
        for row, image in enumerate(images):
            truth_boxes, labels = self.truth[image.numpy().tobytes()]
            count = len(labels)
            shift = torch.linspace(0.0, 0.6, count)[:, None] * truth_boxes[:, 2:]
            boxes[row, :count] = torch.cat([truth_boxes[:, :2] + shift, truth_boxes[:, 2:]], 1)
            logits[row, torch.arange(count), labels] = torch.linspace(3.0, 1.0, count)
            logits[row, count, 0] = 2.0  # a confident false positive in the middle of the image
        return {"pred_logits": logits, "pred_boxes": boxes}

from dfine.evaluation.loop import evaluate
oracle = Oracle(run.val_loader.dataset)
metrics = evaluate(oracle, run.postprocessor, run.val_loader, run.device)
if run.context.rank == 0:
    (open(f"{sys.argv[2]}/oracle.json", "w")).write(json.dumps(metrics))
dfine.distributed.cleanup()  # as dfine-train does: a gloo group left to the exit can abort it
"""


def _dataset_with_equal_box_counts(tmp_path: Path) -> tuple[Path, Path]:
    """Quickstart's 4 training images, each cut down to the same number of boxes (the smallest count)."""
    folder = ensure_quickstart(tmp_path / "data", split="train", num_images=4)
    coco = json.loads((folder / "annotations.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    count = min(len(v) for v in by_image.values())
    assert len(by_image) == 4 and count >= 1, "every image needs boxes"
    coco["annotations"] = [a for v in by_image.values() for a in v[:count]]
    path = tmp_path / "equal_annotations.json"
    path.write_text(json.dumps(coco))
    return folder / "images", path


def _run(command: list[str], env: dict[str, str], what: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{what} hung (killed after 240 s): {str(error.stderr)[-3000:]}")
    assert result.returncode == 0, f"{what} failed:\n{result.stderr[-4000:]}"


@pytest.mark.dist
def test_two_processes_match_one_process_accumulating_the_same_global_batch(tmp_path: Path) -> None:
    # 2 ranks x batch 1 and 1 process x batch 1 x 2 accumulation steps see the same images per forward (so the
    # same BatchNorm batch statistics) and the same summed gradients; equal box counts per image keep the
    # criterion's normaliser equal, and no denoising, flips or multi-scale keep every forward deterministic.
    images, annotations = _dataset_with_equal_box_counts(tmp_path)
    transforms = (
        "{type: Compose, ops: [{type: Resize, size: [96, 96]}, {type: ConvertPILImage, dtype: float32, "
        "scale: true}, {type: ConvertBoxes, fmt: cxcywh, normalize: true}]}"
    )
    dataset = (
        f"{{type: CocoDetection, img_folder: {images}, ann_file: {annotations}, transforms: {transforms}}}"
    )
    script = tmp_path / "worker.py"
    script.write_text(LOSS_WORKER)
    config = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def overrides(run: str, batch: int, accumulation: int) -> list[str]:
        base = tiny_overrides(tmp_path / run, tmp_path / "data", epochs=2)
        base = [o for o in base if not o.startswith(("train_dataloader.dataset.", "train_dataloader.total"))]
        return [
            *base,
            f"train_dataloader.dataset={dataset}",
            "train_dataloader.shuffle=false",
            f"train_dataloader.total_batch_size={batch}",
            f"grad_accum_steps={accumulation}",
            "train_dataloader.collate_fn.base_size_repeat=null",
            "model.decoder.num_denoising=0",
            # The box and local terms are normalised by the size of the union of all layers' matches, averaged
            # over ranks (as the original does): equal to per-micro-batch normalisation only when the images'
            # union sizes agree, which no data can promise. The classification term uses the box count.
            "criterion.losses=[vfl]",
            "val_dataloader.dataset.num_images=3",  # odd: the padded sampler repeats one image on one rank
            "device=cpu",
        ]

    two = tmp_path / "two"
    one = tmp_path / "one"
    two.mkdir()
    one.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    _run([*torchrun, str(script), config, str(two), *overrides("run2", 2, 1)], env, "2-process torchrun")
    env_one = {**env, "EVAL_WEIGHTS": str(two / "weights.pt")}
    _run([sys.executable, str(script), config, str(one), *overrides("run1", 1, 2)], env_one, "1 process")

    distributed = json.loads((two / "losses.json").read_text())
    single = json.loads((one / "losses.json").read_text())
    assert len(distributed["step_losses"]) == 4, distributed
    torch.testing.assert_close(
        torch.tensor(distributed["step_losses"]), torch.tensor(single["step_losses"]), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(distributed["epoch_losses"]), torch.tensor(single["epoch_losses"]), rtol=1e-4, atol=1e-5
    )

    # The same weights scored by 2 ranks (gathered predictions) and by 1 process.
    gathered = json.loads((tmp_path / "run2" / "eval.json").read_text())
    alone = json.loads((one / "metrics.json").read_text())
    assert gathered["num_images"] == alone["num_images"] == 3
    oracle_gathered = json.loads((two / "oracle.json").read_text())
    oracle_alone = json.loads((one / "oracle.json").read_text())
    assert 0.1 < oracle_alone["AP"] < 0.95, oracle_alone  # neither trivial nor perfect
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        assert gathered[key] == pytest.approx(alone[key], abs=1e-6), key
        assert oracle_gathered[key] == pytest.approx(oracle_alone[key], abs=1e-9), key
    assert oracle_gathered["num_images"] == oracle_alone["num_images"] == 3
