"""Pictures of detections: predicted boxes with class names and scores, optionally over the ground truth.

Used by ``dfine-predict`` and by the trainer's validation pictures. Drawing goes through torchvision's
``draw_bounding_boxes``; this module adds what a detector's output needs first: boxes clipped to the image,
invalid ones dropped, one colour per class that stays the same across pictures, and readable labels.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

__all__ = ["class_colour", "draw_detections", "save_image"]

# 20 colours that stay apart on photos and on each other; a class keeps its colour in every picture.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (67, 99, 216),
    (245, 130, 49),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (188, 246, 12),
    (250, 190, 190),
    (0, 128, 128),
    (230, 190, 255),
    (154, 99, 36),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (255, 127, 80),
)
_GROUND_TRUTH_COLOUR = (255, 255, 255)  # neutral: a white box with no prediction on it is a miss
# Black text on a box-coloured patch reads on any background; older torchvision can only write coloured text.
_LABEL_STYLE = (
    {"label_colors": "black", "fill_labels": True}
    if "fill_labels" in inspect.signature(draw_bounding_boxes).parameters
    else {}
)


def class_colour(label: int) -> tuple[int, int, int]:
    """RGB colour of contiguous class ``label`` (the same in every picture)."""
    return _PALETTE[int(label) % len(_PALETTE)]


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label] if 0 <= label < len(class_names) else f"class {label}"


def _drawable(boxes: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Boxes clipped to the image and the mask of those kept.

    Args:
        boxes: [K, 4] xyxy in pixels, possibly outside the image, inverted or not finite.

    Returns:
        ``(clipped [K', 4] xyxy pixels, keep [K] bool)``; dropped: non-finite, inverted (x2 < x1 or y2 < y1)
        and boxes lying wholly outside the image.
    """
    boxes = boxes.detach().to("cpu", torch.float32).reshape(-1, 4)
    keep = torch.isfinite(boxes).all(dim=1)
    keep &= (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    keep &= (boxes[:, 2] >= 0) & (boxes[:, 3] >= 0) & (boxes[:, 0] <= width - 1) & (boxes[:, 1] <= height - 1)
    kept = boxes[keep]
    # The last pixel column is width - 1: PIL draws the right edge at x2 itself.
    kept[:, 0::2] = kept[:, 0::2].clamp(0, width - 1)
    kept[:, 1::2] = kept[:, 1::2].clamp(0, height - 1)
    return kept, keep


def _as_uint8(image: Tensor) -> Tensor:
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [3, H, W] (or [1, H, W]), got shape {list(image.shape)}")
    image = image.detach().cpu()
    if image.is_floating_point():  # accept the model's 0..1 float input as well
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 0..255 or float 0..1, got {image.dtype}")
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    class_names: Sequence[str],
    ground_truth: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Draw detections (and optionally the ground truth) on an image.

    Predicted boxes get their class's colour (`class_colour`) and a filled label such as ``circle 0.87``;
    ground-truth boxes are drawn first, thin and white, labelled with their class name, so a white box with no
    coloured box on it is a missed object. Boxes are clipped to the image; non-finite, inverted and wholly
    outside boxes are skipped. The line width grows with the image (2 pixels at 320).

    Args:
        image: uint8 [3, H, W] (float [3, H, W] in 0..1 is accepted too).
        boxes: [K, 4] xyxy in pixels of ``image``; K may be 0.
        labels: [K] contiguous class labels 0..C-1.
        scores: [K] in 0..1, or None to write class names only.
        class_names: names indexed by label; labels beyond it are written ``class 7``.
        ground_truth: ``(boxes [N, 4] xyxy pixels, labels [N])``, or None.

    Returns:
        uint8 [3, H, W], a new tensor (``image`` is not changed).

    Raises:
        ValueError: ``image`` is not [3, H, W] uint8/float, or ``boxes``, ``labels`` and ``scores`` differ in
            length.
    """
    labels = labels.reshape(-1)
    if len(labels) != len(boxes.reshape(-1, 4)) or (
        scores is not None and len(scores.reshape(-1)) != len(labels)
    ):
        raise ValueError(
            f"boxes ({len(boxes.reshape(-1, 4))}), labels ({len(labels)}) and scores "
            f"({'None' if scores is None else len(scores.reshape(-1))}) must have one entry per detection"
        )
    picture = _as_uint8(image).clone()
    height, width = picture.shape[-2:]
    line_width = max(1, min(4, round(min(height, width) / 160)))
    if ground_truth is not None:
        truth_boxes, truth_labels = ground_truth
        clipped, keep = _drawable(truth_boxes, height, width)
        if len(clipped):
            names = [_class_name(int(v), class_names) for v in truth_labels.reshape(-1).cpu()[keep]]
            picture = draw_bounding_boxes(
                picture,
                clipped,
                labels=names,
                colors=_GROUND_TRUTH_COLOUR,
                width=1,
                **_LABEL_STYLE,
            )
    clipped, keep = _drawable(boxes, height, width)
    if not len(clipped):
        return picture
    kept_labels = [int(v) for v in labels.cpu()[keep]]
    texts = [_class_name(label, class_names) for label in kept_labels]
    if scores is not None:
        kept_scores = scores.detach().reshape(-1).cpu()[keep].tolist()
        texts = [f"{text} {score:.2f}" for text, score in zip(texts, kept_scores, strict=True)]
    # Weakest first, so the most confident box and label end up on top where boxes overlap.
    order = torch.tensor(kept_scores).argsort().tolist() if scores is not None else range(len(texts))
    return draw_bounding_boxes(
        picture,
        clipped[list(order)],
        labels=[texts[i] for i in order],
        colors=[class_colour(kept_labels[i]) for i in order],
        width=line_width,
        **_LABEL_STYLE,
    )


def save_image(image: Tensor, path: str | os.PathLike) -> Path:
    """Write uint8 [3, H, W] (or float 0..1) to ``path``; the suffix picks the format (JPEG quality 92).

    Returns:
        The path written; its folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = _as_uint8(image).permute(1, 2, 0).numpy()
    options = {"quality": 92} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(array).save(path, **options)
    return path
