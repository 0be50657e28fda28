"""Small pure tensor functions: box formats, paired IoU / GIoU and the FDR distance maths."""

from dfine.ops.box_ops import AREA_FLOOR, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, paired_iou_and_giou
from dfine.ops.fdr import (
    box_to_distance,
    distance_to_bins,
    distance_to_box,
    distribution_integral,
    weighting_function,
)

__all__ = [
    "AREA_FLOOR",
    "box_cxcywh_to_xyxy",
    "box_to_distance",
    "box_xyxy_to_cxcywh",
    "distance_to_bins",
    "distance_to_box",
    "distribution_integral",
    "paired_iou_and_giou",
    "weighting_function",
]
