"""Run a model over a validation loader and score it with COCO box AP."""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dfine.data.transforms import original_frame_size
from dfine.distributed import is_main_process
from dfine.evaluation.coco_evaluator import CocoEvaluator

__all__ = ["evaluate", "predict_batch"]

logger = logging.getLogger(__name__)


def predict_batch(
    model: nn.Module, postprocessor: nn.Module, images: Tensor, orig_sizes: Tensor
) -> list[dict[str, Tensor]]:
    """Detections of one batch.

    Args:
        images: [B, 3, H, W] float in 0..1 on the model's device.
        orig_sizes: [B, 2] (width, height) of the original images, in pixels.

    Returns:
        Per image ``labels`` [K] (contiguous 0..C-1), ``boxes`` [K, 4] xyxy pixels of the original image,
        ``scores`` [K].
    """
    outputs = model(images)
    return postprocessor(outputs, orig_sizes)


def _to_categories(result: dict[str, Tensor], category_of_label: Tensor) -> dict[str, Tensor]:
    """One image's detections with labels turned into category ids, on the CPU.

    A model may have more classes than the dataset (``num_classes`` 80 on a 4-class set, or an Objects365 head
    being fine-tuned): detections of labels with no category (table entry -1, or past the table's end) cannot
    match anything and are dropped.
    """
    labels = result["labels"]
    inside = labels < len(category_of_label)  # [K]
    categories = torch.where(inside, category_of_label[labels.clamp(max=len(category_of_label) - 1)], -1)
    keep = categories >= 0  # -1: a category id the dataset does not have
    return {
        "boxes": result["boxes"][keep].float().cpu(),
        "scores": result["scores"][keep].float().cpu(),
        "labels": categories[keep].cpu(),
    }


def _category_table(
    postprocessor: nn.Module, evaluator: CocoEvaluator, category_ids: list[int] | None, dataset: Any
) -> Tensor:
    """``table[label]`` = the category id that label is scored as (-1: none), for :func:`_to_categories`.

    A postprocessor with its own table (``remap_mscoco_category``) already outputs category ids: applying
    ``category_ids`` on top would map them twice, so they pass through 1:1 (ids the ground truth lacks: -1).
    """
    if getattr(postprocessor, "category_ids", None) is None:
        return torch.tensor(category_ids or dataset.label_map.category_ids, dtype=torch.int64)
    known = torch.tensor(evaluator.coco_gt.getCatIds(), dtype=torch.int64)
    table = torch.full((int(known.max()) + 1,), -1, dtype=torch.int64)
    table[known] = known
    return table


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: nn.Module,
    loader: Any,
    device: torch.device,
    evaluator: CocoEvaluator | None = None,
    category_ids: list[int] | None = None,
) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``loader``'s dataset, gathered over all ranks.

    Labels are mapped back to the dataset's category ids and boxes to its original image pixels, so the result
    is comparable with any other detector scored on the same annotation file.

    Args:
        category_ids: the category id of each label the model predicts (from the checkpoint's label map);
            default: the dataset's own label map.

    Returns:
        ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``, ... in 0..1, plus
        ``per_class`` (list of rows) and ``num_images``.
    """
    dataset = loader.dataset
    if evaluator is None:
        evaluator = CocoEvaluator(dataset.to_coco_dict())
    else:
        evaluator.reset()
    category_of_label = _category_table(postprocessor, evaluator, category_ids, dataset).to(device)
    was_training = model.training
    model.eval()
    # A bar only on a terminal: in a log file (SLURM, a pipe) every redrawn frame would stay, joined by '\r'.
    show_bar = is_main_process() and sys.stderr.isatty()
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not show_bar):
        images = images.to(device, non_blocking=True)
        # letterboxed images map back through their padded frame, not the original size
        orig_sizes = torch.stack([original_frame_size(t) for t in targets]).to(device)
        results = predict_batch(model, postprocessor, images, orig_sizes)
        evaluator.update(
            {
                int(target["image_id"]): _to_categories(result, category_of_label)
                for target, result in zip(targets, results, strict=True)
            }
        )
    model.train(was_training)
    metrics: dict[str, Any] = evaluator.summarize()
    metrics["per_class"] = evaluator.per_class
    metrics["num_images"] = len(evaluator.image_ids)
    return metrics
