"""Box conversions and paired IoU / GIoU: hand-worked numbers, torchvision as oracle, empty, point boxes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.testing import assert_close

from dfine.ops.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, paired_iou_and_giou


def random_cxcywh(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand(count, 2, generator=generator)
    size = torch.rand(count, 2, generator=generator) * 0.5 + 0.01
    return torch.cat((centre, size), dim=-1)  # [N, 4] cxcywh, positive sizes


def test_conversions_on_a_hand_worked_box_and_back() -> None:
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    assert_close(box_cxcywh_to_xyxy(boxes), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_conversions_are_bit_identical_to_box_convert_for_valid_boxes() -> None:
    # Callers without inverted boxes use torchvision's box_convert: swapping one for the other must not
    # move a single bit (the parity fixtures of the losses and models compare exactly).
    boxes = random_cxcywh(257)
    xyxy = torchvision.ops.box_convert(boxes, "cxcywh", "xyxy")
    assert torch.equal(box_cxcywh_to_xyxy(boxes), xyxy)
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), torchvision.ops.box_convert(xyxy, "xyxy", "cxcywh"))


def test_negative_sizes_become_point_boxes_with_no_gradient_through_the_size() -> None:
    boxes = torch.tensor([[0.5, 0.5, -0.2, 0.4]], requires_grad=True)
    xyxy = box_cxcywh_to_xyxy(boxes)
    assert_close(xyxy, torch.tensor([[0.5, 0.3, 0.5, 0.7]]))
    xyxy.sum().backward()
    assert boxes.grad is not None and boxes.grad[0, 2] == 0.0


@pytest.mark.parametrize("function", [box_cxcywh_to_xyxy, box_xyxy_to_cxcywh])
def test_no_boxes_give_no_boxes(function) -> None:
    assert function(torch.zeros(0, 4)).shape == (0, 4)
    assert function(torch.zeros(2, 0, 4)).shape == (2, 0, 4)


def test_iou_and_giou_of_hand_worked_pairs() -> None:
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    iou, giou = paired_iou_and_giou(pred, target)
    # overlap 1, union 7, hull 9 | identical boxes | disjoint: union 2, hull 3
    assert_close(iou, torch.tensor([1 / 7, 1.0, 0.0]))
    assert_close(giou, torch.tensor([1 / 7 - 2 / 9, 1.0, -1 / 3]))


def test_iou_and_giou_equal_torchvision_and_broadcast() -> None:
    pred = box_cxcywh_to_xyxy(random_cxcywh(6, seed=1))
    target = box_cxcywh_to_xyxy(random_cxcywh(5, seed=2))
    iou, giou = paired_iou_and_giou(pred[:, None, :], target[None, :, :])  # [6, 5]
    assert_close(iou, torchvision.ops.box_iou(pred, target))
    assert_close(giou, torchvision.ops.generalized_box_iou(pred, target))


def test_zero_area_pairs_give_zero_instead_of_nan() -> None:
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    iou, giou = paired_iou_and_giou(point, point)
    assert iou.tolist() == [0.0] and giou.tolist() == [0.0]
    empty = paired_iou_and_giou(torch.zeros(0, 4), torch.zeros(0, 4))
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
