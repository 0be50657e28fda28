"""Data-loader throughput: dfine's training loader next to a plain PIL + torchvision v2 pipeline.

Both read the quickstart set (generated on first use), apply the full D-FINE training augmentation
(photometric distortion, zoom-out, IoU crop, sanitize, flip, resize to 640 x 640, to float, boxes to
normalised cxcywh) and yield batches of 8. The reference is what one would write by hand:
``Image.open().convert("RGB")``, a ``torchvision.transforms.v2.Compose`` of the same ops and a stacking
collate. Each setting runs twice, alternating, and the faster run is reported (the machine may be shared).

Example:
    python tools/benchmark_data.py                      # 0 and 2 workers, 50 batches each
    python tools/benchmark_data.py --workers 0 2 4 --batches 100 --multi-scale
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from dfine.data import build_dataloader, ensure_quickstart

SIZE = 640
OPS = [
    {"type": "RandomPhotometricDistort", "p": 0.5},
    {"type": "RandomZoomOut", "fill": 0},
    {"type": "RandomIoUCrop", "p": 0.8},
    {"type": "SanitizeBoundingBoxes", "min_size": 1},
    {"type": "RandomHorizontalFlip"},
    {"type": "Resize", "size": [SIZE, SIZE]},
    {"type": "SanitizeBoundingBoxes", "min_size": 1},
    {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
    {"type": "ConvertBoxes", "fmt": "cxcywh", "normalize": True},
]


class ReferenceDataset(Dataset):
    """A hand-written COCO dataset with the same augmentation, straight from torchvision's documentation."""

    def __init__(self, folder: Path) -> None:
        document = json.loads((folder / "annotations.json").read_text())
        self.folder = folder / "images"
        self.images = document["images"]
        boxes: dict[int, list] = {image["id"]: [] for image in self.images}
        for annotation in document["annotations"]:
            x, y, w, h = annotation["bbox"]
            boxes[annotation["image_id"]].append(([x, y, x + w, y + h], annotation["category_id"] - 1))
        self.boxes = boxes
        self.transforms = T.Compose(
            [
                T.RandomPhotometricDistort(p=0.5),
                T.RandomZoomOut(fill=0),
                T.RandomApply([T.RandomIoUCrop()], p=0.8),
                T.SanitizeBoundingBoxes(min_size=1),
                T.RandomHorizontalFlip(),
                T.Resize((SIZE, SIZE)),
                T.SanitizeBoundingBoxes(min_size=1),
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
                T.ConvertBoundingBoxFormat("CXCYWH"),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        image = Image.open(self.folder / info["file_name"]).convert("RGB")
        rows = self.boxes[info["id"]]
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(image.height, image.width),
        )
        target = {"boxes": boxes, "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64)}
        image, target = self.transforms(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor) / SIZE
        return image, target


def _stack(items: list) -> tuple[torch.Tensor, list]:
    return torch.stack([image for image, _ in items]), [target for _, target in items]


def _throughput(loader: Any, batches: int, warmup: int = 3) -> float:
    """Images per second over ``batches`` batches, after ``warmup`` batches (worker start-up excluded)."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        batch, _ = next(iterator)
        images += batch.shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts (default 0 2)")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per run (default 50)")
    parser.add_argument("--root", default=None, help="quickstart cache folder (default: ~/.cache/dfine/...)")
    parser.add_argument("--multi-scale", action="store_true", help="dfine loader with multi-scale batches")
    args = parser.parse_args()

    folder = ensure_quickstart(args.root, "train", 800)
    torch.set_num_threads(1)  # as in loader workers; keeps the two pipelines comparable at 0 workers
    print(f"quickstart train set: {folder} (800 images, 320x320), batch 8, output {SIZE}x{SIZE}")
    print(f"{'workers':>7}  {'dfine (img/s)':>13}  {'reference (img/s)':>17}  {'ratio':>5}")
    for workers in args.workers:
        block = {
            "type": "DataLoader",
            "dataset": {
                "type": "QuickstartDetection",
                "root": args.root,
                "split": "train",
                "num_images": 800,
                "transforms": {"type": "Compose", "ops": OPS},
            },
            "shuffle": True,
            "num_workers": workers,
            "drop_last": True,
            "collate_fn": {
                "type": "BatchImageCollateFunction",
                "base_size": SIZE,
                "base_size_repeat": 3 if args.multi_scale else None,
            },
            "total_batch_size": 8,
        }
        ours = build_dataloader(block, seed=0, num_classes=4)
        ours.set_epoch(0)
        options = {"persistent_workers": True} if workers else {}
        reference = DataLoader(
            ReferenceDataset(folder),
            batch_size=8,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            collate_fn=_stack,
            **options,
        )
        results: dict[str, list[float]] = {"dfine": [], "reference": []}
        for _ in range(2):
            results["reference"].append(_throughput(reference, args.batches))
            results["dfine"].append(_throughput(ours, args.batches))
        best_ours, best_reference = max(results["dfine"]), max(results["reference"])
        print(
            f"{workers:>7}  {best_ours:>13.1f}  {best_reference:>17.1f}  {best_ours / best_reference:>5.2f}"
        )


if __name__ == "__main__":
    main()
