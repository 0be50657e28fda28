"""Pictures of what the model is fed: augmented training batches with their boxes and class names drawn."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from dfine.ops.box_ops import box_cxcywh_to_xyxy

__all__ = ["draw_batch", "first_mixing_epoch", "save_batch_pictures"]

logger = logging.getLogger(__name__)

_PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


def draw_batch(
    images: Tensor, targets: Sequence[dict[str, Any]], names: Sequence[str] | None = None
) -> Tensor:
    """One grid picture of a batch.

    Args:
        images: float32 [B, 3, H, W] in 0..1.
        targets: B dicts with ``boxes`` [N, 4] cxcywh normalised to 0..1 and ``labels`` [N]; a MixUp batch's
            ``mixup`` [N] weights are written after each name (``circle 0.47``).
        names: class names indexed by label (the dataset's ``label_map.names``); None writes label numbers.

    Returns:
        uint8 [3, H', W'] grid, boxes and names drawn.
    """
    pictures = []
    for image, target in zip(images, targets, strict=True):
        height, width = image.shape[-2:]
        boxes = box_cxcywh_to_xyxy(target["boxes"].detach().cpu().float().reshape(-1, 4))
        xyxy = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)  # [N, 4] pixels
        labels = [int(label) for label in target["labels"]]
        text = [
            names[label] if names is not None and 0 <= label < len(names) else str(label) for label in labels
        ]
        if "mixup" in target:
            text = [f"{name} {float(weight):.2f}" for name, weight in zip(text, target["mixup"], strict=True)]
        colours = [_PALETTE[label % len(_PALETTE)] for label in labels]
        pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        pictures.append(draw_bounding_boxes(pixels, xyxy, labels=text, colors=colours, width=2))
    return make_grid(pictures, nrow=max(1, math.ceil(math.sqrt(len(pictures)))), padding=4)


def first_mixing_epoch(loader: Any) -> int:
    """The first epoch whose batches can hold Mosaic or MixUp (0 when neither is configured), so
    ``--show-batch`` draws the images DEIM's recipe actually composes."""
    epochs = []
    policy = getattr(getattr(getattr(loader, "dataset", None), "transforms", None), "policy", None) or {}
    if isinstance(policy.get("epoch"), list):
        epochs.append(policy["epoch"][0])
    collate = getattr(loader, "collate_fn", None)
    if getattr(collate, "mixup_prob", 0.0) > 0:
        epochs.append(collate.mixup_epochs[0])
    return max(0, min(epochs)) if epochs else 0


def save_batch_pictures(loader: Iterable[Any], num_batches: int, out_dir: str | os.PathLike) -> list[Path]:
    """Write the first ``num_batches`` batches of ``loader`` as ``batch_000.jpg``, ... (``--show-batch N``).

    Class names come from ``loader.dataset.label_map`` when the loader has one.

    Returns:
        Paths of the written pictures.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_map = getattr(getattr(loader, "dataset", None), "label_map", None)
    names = label_map.names if label_map is not None else None
    written = []
    for number, (images, targets) in enumerate(loader):
        if number >= num_batches:
            break
        grid = draw_batch(images, targets, names)
        path = out / f"batch_{number:03d}.jpg"
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path, quality=92)
        written.append(path)
    logger.info("wrote %d batch pictures to %s", len(written), out)
    return written
