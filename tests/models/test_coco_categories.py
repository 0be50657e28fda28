"""COCO's 80 class names: from torchvision's table, equal to the list written out before, aligned with ids."""

from __future__ import annotations

from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

from dfine.models.coco_categories import COCO80_TO_COCO91, COCO_NAMES

# The names as they were written out by hand before they came from torchvision.
WRITTEN_OUT = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def test_names_equal_the_list_written_out_before() -> None:
    assert WRITTEN_OUT == COCO_NAMES


def test_each_name_is_the_one_torchvision_gives_its_official_id() -> None:
    by_official_id = FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    assert [by_official_id[category_id] for category_id in COCO80_TO_COCO91] == list(COCO_NAMES)
