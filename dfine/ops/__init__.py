"""Small pure tensor functions: box formats, IoU and the FDR distance maths."""

from dfine.ops.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from dfine.ops.fdr import (
    box_to_distance,
    distance_to_bins,
    distance_to_box,
    distribution_integral,
    weighting_function,
)

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_to_distance",
    "box_xyxy_to_cxcywh",
    "distance_to_bins",
    "distance_to_box",
    "distribution_integral",
    "elementwise_generalized_box_iou",
    "generalized_box_iou",
    "weighting_function",
]
