"""The 80 COCO detection class names in label order (0..79).

Read from torchvision's COCO table (names indexed by the official category id, with '__background__' at 0 and
'N/A' at the 10 ids COCO never used); ``dfine.models.postprocessor.COCO80_TO_COCO91`` takes the ids from the
same table, so ``COCO_NAMES[label]`` names category ``COCO80_TO_COCO91[label]``.

Used to name the predictions of COCO-trained weights that carry no label map (the published D-FINE files).
"""

from __future__ import annotations

from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

__all__ = ["COCO_NAMES"]

COCO_NAMES: tuple[str, ...] = tuple(
    name
    for name in FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    if name not in ("__background__", "N/A")
)
