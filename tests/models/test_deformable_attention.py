"""MSDeformableAttention's deployed form and the per-head value maps read straight from the feature maps."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dfine.models.deformable_attention import (
    MSDeformableAttention,
    split_value_levels,
    value_levels_from_maps,
)

SHAPES = [(5, 7), (3, 2), (4, 4)]  # rectangular maps, one smaller than a 2x2 bilinear footprint
POINTS = (3, 6, 2)
CHANNELS, HEADS = 16, 4


def _maps(batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, CHANNELS, h, w, generator=generator) for h, w in SHAPES]


def _attention(method: str) -> MSDeformableAttention:
    torch.manual_seed(0)
    attention = MSDeformableAttention(CHANNELS, HEADS, len(SHAPES), POINTS, method=method)
    with torch.no_grad():  # offsets that reach past the maps, and attention weights far from uniform
        attention.sampling_offsets.weight.normal_(0, 0.5)
        attention.attention_weights.weight.normal_(0, 0.5)
        attention.attention_weights.bias.normal_(0, 1.0)
    return attention.eval()


def _queries(batch_size: int, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(batch_size, num_queries, CHANNELS, generator=generator)
    centres = torch.rand(batch_size, num_queries, 2, generator=generator)
    sizes = torch.rand(batch_size, num_queries, 2, generator=generator) * 0.8 + 0.01
    return query, torch.cat((centres, sizes), dim=-1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_value_maps_read_from_the_feature_maps_equal_those_split_from_memory(channels_last: bool) -> None:
    maps = _maps(2)
    memory = torch.cat([level.flatten(2).transpose(1, 2) for level in maps], dim=1)  # [B, S, C]
    if channels_last:
        maps = [level.to(memory_format=torch.channels_last) for level in maps]
    expected = split_value_levels(memory, SHAPES, HEADS)
    got = value_levels_from_maps(maps, HEADS)
    assert [tuple(level.shape) for level in got] == [(2 * HEADS, CHANNELS // HEADS, h, w) for h, w in SHAPES]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_deployed_attention_gives_the_eval_outputs(method: str) -> None:
    attention = _attention(method)
    query, boxes = _queries(2, 9)
    values = value_levels_from_maps(_maps(2), HEADS)
    with torch.no_grad():
        expected = attention(query, boxes, values)
        attention.convert_to_deploy()
        attention.convert_to_deploy()  # a second call changes nothing
        deployed = attention(query, boxes, values)
    assert deployed.shape == (2, 9, CHANNELS)
    assert_close(deployed, expected, rtol=0, atol=1e-5)
    # the offsets are predicted by the folded layer: the original one is gone, so its key is too
    keys = set(attention.state_dict())
    assert "grid_offsets.weight" in keys and not [key for key in keys if key.startswith("sampling_offsets")]


def test_deployed_attention_follows_each_point_scale_and_axis() -> None:
    # One head, one non-zero offset row at a time: the folded layer must move exactly that point on that axis
    # by the same amount as the original (a wrong regrouping or scale moves another point or the other axis).
    torch.manual_seed(0)
    attention = MSDeformableAttention(8, 1, 2, (2, 3)).eval()
    with torch.no_grad():
        attention.sampling_offsets.weight.zero_()
        attention.sampling_offsets.bias.zero_()
        attention.sampling_offsets.bias[2 * 3 + 1] = 1.5  # point 3 (the 2nd of level 1), y
        attention.attention_weights.bias.copy_(torch.tensor([-9.0, -9.0, -9.0, 9.0, -9.0]))
    generator = torch.Generator().manual_seed(2)
    maps = [torch.randn(1, 8, 6, 6, generator=generator), torch.randn(1, 8, 5, 4, generator=generator)]
    values = value_levels_from_maps(maps, 1)
    query = torch.randn(1, 3, 8, generator=generator)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.5], [0.7, 0.2, 0.6, 0.2]]])
    with torch.no_grad():
        expected = attention(query, boxes, values)
        attention.convert_to_deploy()
        deployed = attention(query, boxes, values)
    assert_close(deployed, expected, rtol=0, atol=1e-6)
    # the sample sits at y = cy + 1.5 / 3 * h * 0.5 of level 1: read it from the map by hand
    centre_y = boxes[0, :, 1] + 1.5 / 3 * boxes[0, :, 3] * 0.5
    grid = torch.stack((2 * boxes[0, :, 0] - 1, 2 * centre_y - 1), dim=-1).reshape(1, 3, 1, 2)
    by_hand = torch.nn.functional.grid_sample(maps[1], grid, align_corners=False)[0, :, :, 0].T  # [3, 8]
    weight = torch.softmax(attention.attention_weights.bias, dim=0)[3]
    assert_close(deployed[0], by_hand * weight, rtol=0, atol=1e-4)


def test_the_decoder_reads_its_value_maps_without_splitting_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from dfine.models import decoder_layers
    from dfine.models.decoder import DFINETransformer

    torch.manual_seed(0)
    decoder = DFINETransformer(
        num_classes=3,
        hidden_dim=16,
        num_queries=5,
        feat_channels=(16, 16),
        feat_strides=(8, 16),
        num_levels=2,
        num_points=(2, 2),
        nhead=4,
        num_layers=1,
        dim_feedforward=32,
        reg_max=4,
        eval_spatial_size=(32, 32),
    ).eval()
    feats = [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2)]

    def split_again(*args: object) -> None:
        raise AssertionError("the value maps were split from memory again")

    monkeypatch.setattr(decoder_layers, "split_value_levels", split_again)
    with torch.no_grad():
        outputs = decoder(feats)  # raises if the layers split memory instead of reading the maps
    assert outputs["pred_boxes"].shape == (1, 5, 4)
