"""Checks on a run's history that catch set-ups which train without error but cannot learn to detect."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["zero_ap_warning"]


def zero_ap_warning(history: Sequence[Mapping[str, Any]], min_evaluations: int = 3) -> str | None:
    """A warning when the training loss falls while every validation AP so far is exactly 0.

    A model that fits its training targets but never scores a single true positive usually sees labels or
    boxes that do not mean what the evaluator thinks they mean, so the message lists those causes.

    Args:
        history: per-epoch records as kept by the trainer: ``loss`` (mean training loss) and, for epochs
            that were evaluated, ``val_AP`` (0..1).
        min_evaluations: how many evaluations with AP 0 it takes before the warning is given.

    Returns:
        The warning text, or ``None`` when nothing looks wrong (or it is too early to tell).
    """
    evaluated = [r for r in history if isinstance(r.get("val_AP"), (int, float))]
    losses = [float(r["loss"]) for r in history if isinstance(r.get("loss"), (int, float))]
    if len(evaluated) < min_evaluations or len(losses) < 2:
        return None
    if any(float(r["val_AP"]) > 0 for r in evaluated) or not losses[-1] < losses[0]:
        return None
    return (
        f"val AP is 0 after {len(evaluated)} evaluations while the training loss fell from "
        f"{losses[0]:.4g} to {losses[-1]:.4g}: the model learns the training targets but none of its "
        "detections match the validation annotations. Usual causes: (1) the label map / category ids "
        "(remap_mscoco_category, categories missing or ordered differently in the val annotation file); "
        "(2) the box format: training targets must be cxcywh normalised to 0..1 (ConvertBoxes fmt: cxcywh, "
        "normalize: true as the last transform); (3) num_classes smaller than the dataset's number of "
        "classes. dfine-train --check-data and --show-batch help to check them."
    )
