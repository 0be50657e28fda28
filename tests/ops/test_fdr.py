"""FDR maths (weighting function, integral, distance <-> box): hand-worked numbers and the original."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from dfine.ops.box_ops import box_cxcywh_to_xyxy
from dfine.ops.fdr import (
    box_to_distance,
    distance_to_bins,
    distance_to_box,
    distribution_integral,
    weighting_function,
)

UP = torch.tensor([0.5])


def test_weighting_function_with_four_intervals_is_minus_four_to_four_in_steps_of_two() -> None:
    # up * reg_scale = 2, step = (2 + 1) ** (2 / (4 - 2)) = 3: W = [-2*2, -(3 - 1), 0, 3 - 1, 2*2]
    assert_close(weighting_function(4, UP, 4.0), torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0]))


def test_weighting_function_with_eight_intervals_follows_powers_of_the_step() -> None:
    step = 3 ** (1 / 3)  # (up * reg_scale + 1) ** (2 / (8 - 2))
    inner = [step**k - 1 for k in (1, 2, 3)]
    expected = [-4.0] + [-v for v in reversed(inner)] + [0.0] + inner + [4.0]
    values = weighting_function(8, UP, torch.tensor([4.0]))
    assert_close(values, torch.tensor(expected))
    assert values[7].item() == pytest.approx(2.0)  # the second-outermost bin reaches up * reg_scale


def test_weighting_function_rejects_an_odd_number_of_intervals() -> None:
    with pytest.raises(ValueError, match="even"):
        weighting_function(5, UP, 4.0)


def test_integral_of_uniform_logits_is_zero_and_of_a_peak_is_its_bin_value() -> None:
    project = weighting_function(4, UP, 4.0)
    uniform = torch.zeros(2, 3, 4 * 5)
    assert_close(distribution_integral(uniform, project), torch.zeros(2, 3, 4))
    peaked = torch.full((1, 4, 5), -100.0)
    for edge, bin_index in enumerate((0, 1, 3, 4)):
        peaked[0, edge, bin_index] = 100.0
    assert_close(
        distribution_integral(peaked.reshape(1, 20), project), torch.tensor([[-4.0, -2.0, 2.0, 4.0]])
    )


def test_integral_of_two_equal_peaks_is_their_mean() -> None:
    project = weighting_function(4, UP, 4.0)
    logits = torch.full((4, 5), -100.0)
    logits[:, 3] = logits[:, 4] = 0.0  # half the mass on W=2, half on W=4
    assert_close(distribution_integral(logits.reshape(20), project), torch.full((4,), 3.0))


def test_zero_distances_give_back_the_reference_box() -> None:
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.05]])
    assert_close(distance_to_box(ref, torch.zeros(2, 4), 4.0), ref)


def test_a_distance_of_one_moves_an_edge_by_a_quarter_width_at_reg_scale_four() -> None:
    # unit = w / reg_scale = 0.05; left edge 0.5 - (2 + 1) * 0.05 = 0.35; right edge stays at 0.6
    ref = torch.tensor([0.5, 0.5, 0.2, 0.4])
    box = distance_to_box(ref, torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.tensor([4.0]))
    # top 0.5 - 2 * 0.1 = 0.3, bottom 0.5 + (2 - 1) * 0.1 = 0.6
    assert_close(box, torch.tensor([0.475, 0.45, 0.25, 0.3]))


def test_distance_to_bins_interpolates_between_neighbours_and_saturates_outside() -> None:
    # W = [-4, -2, 0, 2, 4]
    distance = torch.tensor([1.0, 3.0, -4.0, -5.0, 4.0, 5.0])
    left, weight_right, weight_left = distance_to_bins(distance, 4, UP, 4.0)
    assert_close(left, torch.tensor([2.0, 3.0, 0.0, 0.0, 3.9, 3.9]))
    assert_close(weight_right, torch.tensor([0.5, 0.5, 0.0, 0.0, 1.0, 1.0]))
    assert_close(weight_left, torch.tensor([0.5, 0.5, 1.0, 1.0, 0.0, 0.0]))


def test_box_to_distance_inverts_distance_to_box_inside_the_range() -> None:
    reg_max, reg_scale = 8, torch.tensor([4.0])
    project = weighting_function(reg_max, UP, reg_scale)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.4, 0.3, 0.3, 0.2]])
    distance = torch.tensor([[0.3, -0.7, 1.5, 2.2], [-1.1, 0.0, 0.9, -0.2]])
    boxes_xyxy = box_cxcywh_to_xyxy(distance_to_box(ref, distance, reg_scale))
    position, weight_right, weight_left = box_to_distance(ref, boxes_xyxy, reg_max, UP, reg_scale)
    index = position.floor().long()
    recovered = project[index] * weight_left + project[index + 1] * weight_right
    assert_close(recovered, distance.reshape(-1), atol=1e-5, rtol=0)


def test_empty_inputs_give_empty_outputs() -> None:
    project = weighting_function(4, UP, 4.0)
    assert distribution_integral(torch.zeros(0, 20), project).shape == (0, 4)
    assert distance_to_box(torch.zeros(0, 4), torch.zeros(0, 4), 4.0).shape == (0, 4)
    position, _, _ = box_to_distance(torch.zeros(0, 4), torch.zeros(0, 4), 4, UP, 4.0)
    assert position.shape == (0,)


def test_inverted_predictions_become_point_boxes_in_xyxy() -> None:
    # Strongly negative edge offsets can give w < 0; like the original, xyxy treats that as zero width.
    boxes = distance_to_box(torch.tensor([0.5, 0.5, 0.2, 0.2]), torch.tensor([-3.0, 0.0, -3.0, 0.0]), 4.0)
    assert boxes[2] < 0
    assert_close(box_cxcywh_to_xyxy(boxes), torch.tensor([0.5, 0.4, 0.5, 0.6]))


# ------------------------------------------------------------------------------------------ against original
def _original_utils(original: Path):
    if str(original) not in sys.path:
        sys.path.insert(0, str(original))
    from src.zoo.dfine import dfine_utils

    return dfine_utils


@pytest.mark.original
@pytest.mark.parametrize(("reg_max", "up", "reg_scale"), [(32, 0.5, 4.0), (16, 0.47, 8.0), (8, -0.6, -3.0)])
def test_fdr_functions_equal_the_original(original: Path, reg_max: int, up: float, reg_scale: float) -> None:
    theirs = _original_utils(original)
    up_t, scale_t = torch.tensor([up]), torch.tensor([reg_scale])
    project = weighting_function(reg_max, up_t, scale_t)
    assert_close(project, theirs.weighting_function(reg_max, up_t, scale_t), rtol=0, atol=1e-6)
    assert_close(project, theirs.weighting_function(reg_max, up_t, scale_t, deploy=True), rtol=0, atol=1e-6)

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 4 * (reg_max + 1), generator=generator) * 3
    probs = torch.softmax(logits.reshape(-1, reg_max + 1), dim=1)
    their_integral = torch.nn.functional.linear(probs, project).reshape(2, 7, 4)
    assert_close(distribution_integral(logits, project), their_integral, rtol=0, atol=1e-6)

    ref = torch.rand(2, 7, 4, generator=generator) * 0.5 + 0.1
    distance = torch.randn(2, 7, 4, generator=generator) * 2
    assert_close(
        distance_to_box(ref, distance, scale_t),
        theirs.distance2bbox(ref, distance, scale_t),
        rtol=0,
        atol=1e-6,
    )

    gt = torch.randn(50, generator=generator) * abs(up * reg_scale) * 1.5
    for ours, expected in zip(
        distance_to_bins(gt, reg_max, up_t, scale_t),
        theirs.translate_gt(gt, reg_max, scale_t, up_t),
        strict=True,
    ):
        assert_close(ours, expected, rtol=0, atol=1e-6)

    points = ref.reshape(-1, 4)
    boxes_xyxy = box_cxcywh_to_xyxy(torch.rand(14, 4, generator=generator) * 0.4 + 0.2)
    ours = box_to_distance(points, boxes_xyxy, reg_max, up_t, scale_t)
    expected = theirs.bbox2distance(points, boxes_xyxy, reg_max, scale_t, up_t)
    for a, b in zip(ours, expected, strict=True):
        assert_close(a, b, rtol=0, atol=1e-5)
    assert not math.isnan(float(ours[0].sum()))
