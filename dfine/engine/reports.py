"""What a person looks at after each evaluation: ``results.png``, PR and F1 curves, and validation pictures.

Everything here runs on rank 0 after the COCO metrics are known and never stops training: matplotlib is an
optional extra (the curves' numbers are still computed and logged without it), and a failing plot is logged
as a warning, not raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert
from torchvision.utils import make_grid

from dfine.engine.run_log import RunLog

__all__ = ["EvalReport", "validation_pictures"]

logger = logging.getLogger(__name__)

# Detections below this score are not drawn when no best-F1 threshold is known yet.
DEFAULT_PICTURE_THRESHOLD = 0.3


@torch.no_grad()
def validation_pictures(
    model: nn.Module,
    postprocessor: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    device: torch.device,
    class_names: Sequence[str],
    threshold: float,
) -> list[Tensor]:
    """Validation images (as the model sees them) with ground truth and detections above ``threshold`` drawn.

    Returns:
        uint8 [3, H, W] pictures, one per index.
    """
    from dfine.inference.drawing import draw_detections

    was_training = model.training
    model.eval()
    pictures = []
    for index in indices:
        image, target = dataset[index]  # image float [3, H, W] 0..1; boxes cxcywh normalised
        height, width = image.shape[-2:]
        frame = torch.tensor([[width, height]], dtype=torch.float32, device=device)
        detections = postprocessor(model(image.unsqueeze(0).to(device)), frame)[0]
        keep = detections["scores"] >= threshold
        truth = target["boxes"].reshape(-1, 4).float()  # [N, 4] cxcywh 0..1
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        truth_xyxy = box_convert(truth, in_fmt="cxcywh", out_fmt="xyxy") * scale  # [N, 4] xyxy pixels
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        pictures.append(
            draw_detections(
                pixels,
                detections["boxes"][keep].cpu(),
                detections["labels"][keep].cpu(),
                detections["scores"][keep].cpu(),
                class_names,
                ground_truth=(truth_xyxy, target["labels"].reshape(-1)),
            )
        )
    model.train(was_training)
    return pictures


class EvalReport:
    """Writes ``results.png``, ``pr_curve.png``, ``f1_curve.png`` and ``val_predictions.jpg`` in the run.

    Args:
        output_dir: the run folder.
        run_log: where the pictures also go (TensorBoard).
        class_names: name of each label 0..C-1, for legends and drawn boxes.
        num_pictures: how many validation images to draw (the first ones, so epochs are comparable).
        enabled: ``False`` on ranks other than 0.
    """

    def __init__(
        self,
        output_dir: str | Path,
        run_log: RunLog,
        class_names: Sequence[str],
        num_pictures: int = 4,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.run_log = run_log
        self.class_names = list(class_names)
        self.num_pictures = num_pictures
        self.enabled = enabled
        self._said_no_matplotlib = False

    def after_evaluation(
        self,
        epoch: int,
        history: Sequence[Mapping[str, Any]],
        evaluator: Any,
        model: nn.Module,
        postprocessor: nn.Module,
        dataset: Any,
        device: torch.device,
    ) -> dict[str, float]:
        """Write this evaluation's pictures; returns ``val_best_f1`` and ``val_f1_threshold`` for the log."""
        if not self.enabled:
            return {}
        from dfine.engine.plots import matplotlib_available
        from dfine.evaluation.curves import detection_curves

        summary: dict[str, float] = {}
        curves = None
        try:
            curves = detection_curves(
                evaluator.coco_gt.dataset, evaluator.to_coco_results(), image_ids=evaluator.image_ids
            )
            summary = {"val_best_f1": float(curves.best_f1), "val_f1_threshold": float(curves.best_threshold)}
            logger.info("%s: a good dfine-predict --threshold", curves.describe())
        except Exception as error:  # a report must never end a training run
            logger.warning("could not compute PR/F1 curves: %s", error)
        threshold = summary.get("val_f1_threshold", DEFAULT_PICTURE_THRESHOLD)
        self._pictures(epoch, model, postprocessor, dataset, device, threshold)
        if matplotlib_available():
            self._plots(history, curves)
        elif not self._said_no_matplotlib:
            logger.info(
                "matplotlib is not installed: skipped results.png, pr_curve.png and f1_curve.png "
                '(pip install -e ".[plots]"); metrics.jsonl and TensorBoard have the numbers'
            )
            self._said_no_matplotlib = True
        return summary

    def _plots(self, history: Sequence[Mapping[str, Any]], curves: Any) -> None:
        from dfine.engine.plots import plot_f1_curve, plot_pr_curve, plot_results

        jobs = [(plot_results, history, "results.png")]
        if curves is not None:
            jobs += [(plot_pr_curve, curves, "pr_curve.png"), (plot_f1_curve, curves, "f1_curve.png")]
        for plot, data, name in jobs:
            try:
                plot(data, self.output_dir / name)
            except Exception as error:  # a report must never end a training run
                logger.warning("could not draw %s: %s", name, error)

    def _pictures(
        self,
        epoch: int,
        model: nn.Module,
        postprocessor: nn.Module,
        dataset: Any,
        device: torch.device,
        threshold: float,
    ) -> None:
        count = min(self.num_pictures, len(dataset))
        if count == 0:
            return
        try:
            pictures = validation_pictures(
                model, postprocessor, dataset, range(count), device, self.class_names, threshold
            )
        except Exception as error:  # a report must never end a training run
            logger.warning("could not draw validation pictures: %s", error)
            return
        from dfine.inference.drawing import save_image

        if len({tuple(p.shape) for p in pictures}) == 1:
            grid = make_grid(pictures, nrow=min(count, 4), padding=4, pad_value=255)
            save_image(grid, self.output_dir / "val_predictions.jpg")
        else:  # letterboxed or kept-ratio images of different sizes: one file each
            for index, picture in enumerate(pictures):
                save_image(picture, self.output_dir / f"val_predictions_{index}.jpg")
        self.run_log.images("val_predictions", pictures, epoch)
