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

# Builds the Trainer from a config file and overrides, trains, and saves each rank's final weights.
WORKER = """
import sys, torch
import dfine
from dfine.engine.trainer import Trainer
torch.set_num_threads(1)
trainer = Trainer(dfine.load_config(sys.argv[1], sys.argv[3:]))
trainer.fit()
rank = trainer.context.rank
torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict()},
           f"{sys.argv[2]}/rank{rank}.pt")
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
        str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yml"),
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
