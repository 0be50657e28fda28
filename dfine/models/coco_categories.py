"""COCO's 80 detection categories in label order (0..79): their official ids and their names, from one table.

torchvision's COCO table lists the names by official id, with '__background__' at 0 and 'N/A' at the 10 ids
COCO never used; dropping those gives both columns at once, so ``COCO_NAMES[label]`` always names category
``COCO80_TO_COCO91[label]``. The post-processor maps labels to ids with it (``remap_mscoco_category``); the
predictor names the detections of COCO-trained weights that carry no label map (the published D-FINE files).
"""

from __future__ import annotations

from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

__all__ = ["COCO80_TO_COCO91", "COCO_NAMES"]

_USED = [
    (category_id, name)
    for category_id, name in enumerate(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
    if name not in ("__background__", "N/A")
]
COCO80_TO_COCO91: tuple[int, ...] = tuple(category_id for category_id, _ in _USED)
COCO_NAMES: tuple[str, ...] = tuple(name for _, name in _USED)
