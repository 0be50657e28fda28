"""Multi-scale deformable cross-attention with a per-level number of sampling points.

Each query looks at a handful of points around its reference box on every feature level and mixes their
features with softmax weights it predicts itself. The sampling core is a pure function with two methods:

- ``"default"``: bilinear interpolation (``F.grid_sample``), differentiable in the sampling locations.
- ``"discrete"``: the nearest feature-map cell, read with a plain gather, for runtimes without GridSample
  (some TensorRT / NPU targets). It agrees with ``"default"`` exactly at cell centres and rounds elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfine.config.registry import ConfigError

__all__ = [
    "SAMPLING_METHODS",
    "MSDeformableAttention",
    "deformable_sampling",
    "split_value_levels",
    "value_levels_from_maps",
]

SAMPLING_METHODS: tuple[str, ...] = ("default", "discrete")


def split_value_levels(
    memory: Tensor, spatial_shapes: Sequence[tuple[int, int]], num_heads: int
) -> list[Tensor]:
    """Cut flattened multi-level features into one per-head feature map per level.

    Args:
        memory: [B, S, C] features of all levels, row-major per level, S = sum of H_l * W_l.
        spatial_shapes: (H_l, W_l) of each level, in the order they are stacked in ``memory``.
        num_heads: M attention heads; C must be divisible by M.

    Returns:
        One [B * M, C / M, H_l, W_l] tensor per level.
    """
    batch_size, _, channels = memory.shape
    head_dim = channels // num_heads
    per_head = memory.reshape(batch_size, -1, num_heads, head_dim).permute(0, 2, 3, 1)  # [B, M, D, S]
    sizes = [height * width for height, width in spatial_shapes]
    return [
        level.reshape(batch_size * num_heads, head_dim, height, width)
        for level, (height, width) in zip(per_head.split(sizes, dim=-1), spatial_shapes, strict=True)
    ]


def value_levels_from_maps(maps: Sequence[Tensor], num_heads: int) -> list[Tensor]:
    """The per-head value maps of :func:`split_value_levels`, read straight from the [B, C, H_l, W_l] maps.

    Equal values to flattening the maps into ``memory`` and splitting it again, without the two transposes: a
    head's channels are consecutive, so a map is already [B * M, C / M, H_l, W_l] in NCHW order.
    """
    return [
        level.reshape(level.shape[0] * num_heads, level.shape[1] // num_heads, level.shape[2], level.shape[3])
        for level in maps
    ]


def _gather_nearest(value: Tensor, locations: Tensor) -> Tensor:
    """Read the cell containing each location (align_corners=False convention), clamped to the map.

    Args:
        value: [N, D, H, W] feature map.
        locations: [N, Q, P, 2] (x, y) in 0..1 of the map's width and height.

    Returns:
        [N, D, Q, P] features.
    """
    n, channels, height, width = value.shape
    _, num_queries, num_points, _ = locations.shape
    # Cell i covers [i / W, (i + 1) / W): its index is floor(x * W). Clamping per axis keeps rectangular
    # maps correct.
    column = (locations[..., 0] * width).floor().clamp(0, width - 1).long()
    row = (locations[..., 1] * height).floor().clamp(0, height - 1).long()
    index = (row * width + column).reshape(n, 1, num_queries * num_points)  # [N, 1, Q * P]
    sampled = value.reshape(n, channels, height * width).gather(2, index.expand(n, channels, -1))
    return sampled.reshape(n, channels, num_queries, num_points)


def deformable_sampling(
    value_levels: Sequence[Tensor],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    num_points_per_level: Sequence[int],
    method: str = "default",
) -> Tensor:
    """Sample every level at each query's points and sum the samples with the attention weights.

    Args:
        value_levels: per level, [B * M, D, H_l, W_l] (see :func:`split_value_levels`).
        sampling_locations: [B, Q, M, P, 2] (x, y) in 0..1 of each level's extent, P = sum of the points
            per level, points of level 0 first.
        attention_weights: [B, Q, M, P], softmax-normalised over P.
        num_points_per_level: points per level, summing to P.
        method: ``"default"`` (bilinear, zero outside the map) or ``"discrete"`` (nearest cell, clamped).

    Returns:
        [B, Q, M * D] attended features.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; use one of {SAMPLING_METHODS}")
    batch_size, num_queries, num_heads, num_points, _ = sampling_locations.shape
    head_dim = value_levels[0].shape[1]
    locations = sampling_locations.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B * M, Q, P, 2]
    samples = []
    level_locations_list = locations.split(list(num_points_per_level), dim=-2)
    for value, level_locations in zip(value_levels, level_locations_list, strict=True):
        if method == "default":
            # grid_sample needs one dtype; compute in the wider of the two (fp32 locations under autocast).
            dtype = torch.promote_types(value.dtype, level_locations.dtype)
            grid = 2 * level_locations.to(dtype) - 1
            samples.append(
                F.grid_sample(
                    value.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False
                )
            )
        else:
            samples.append(_gather_nearest(value, level_locations))
    sampled = torch.cat(samples, dim=-1)  # [B * M, D, Q, P]
    weights = attention_weights.permute(0, 2, 1, 3).reshape(
        batch_size * num_heads, 1, num_queries, num_points
    )
    output = (sampled * weights).sum(-1)  # [B * M, D, Q]
    return output.reshape(batch_size, num_heads * head_dim, num_queries).permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    """Deformable cross-attention from queries to multi-level features around reference boxes.

    Offsets are predicted in units of the reference box size: a point of a level with ``n`` points lands at
    ``box_centre + offset * (1 / n) * box_wh * offset_scale`` (buffer ``num_points_scale`` holds ``1 / n``).
    No value or output projection (D-FINE drops them; the decoder layer's gate mixes the result).

    Args:
        embed_dim: query and feature width C.
        num_heads: M heads; C must be divisible by M.
        num_levels: number of feature levels L.
        num_points: points per level, one int for all levels or one per level.
        method: ``"default"`` (bilinear) or ``"discrete"`` (nearest cell; the offset predictor is frozen since
            the gather carries no gradient to the locations).
        offset_scale: multiplies the offsets (0.5 lets the outermost point reach the box edge).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int | Sequence[int] = 4,
        method: str = "default",
        offset_scale: float = 0.5,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if method not in SAMPLING_METHODS:
            raise ConfigError(f"unknown cross_attn_method {method!r}; use one of {SAMPLING_METHODS}")
        if isinstance(num_points, int):
            points = (num_points,) * num_levels
        else:
            points = tuple(int(n) for n in num_points)
        if len(points) != num_levels:
            raise ConfigError(
                f"num_points {list(points)} must give one count per level ({num_levels} levels)"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points_list = points
        self.total_points = sum(points)
        self.method = method
        self.offset_scale = offset_scale
        scale = [1.0 / n for n in points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))  # [P]
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * self.total_points)
        self.reset_parameters()
        if method == "discrete":
            self.sampling_offsets.requires_grad_(False)
        self.deployed = False

    def reset_parameters(self) -> None:
        """Start with zero attention logits and points fanned out along one direction per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)  # [M, 2]
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values  # onto the unit square
        distance = torch.cat(
            [torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points_list]
        )  # [P]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((directions[:, None, :] * distance[None, :, None]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def convert_to_deploy(self) -> None:
        """Predict sampling coordinates directly and lay the samples out for cheap weighted sums.

        ``sampling_offsets`` becomes ``grid_offsets``: its rows regrouped x block first, then y block, and
        scaled by ``offset_scale / n`` (times 2 for grid_sample's -1..1 coordinates), so one multiply-add per
        value turns the prediction into coordinates. Each level is sampled as [B * M, D, P_l, Q] instead of
        [B * M, D, Q, P_l], so the attention weights broadcast over whole rows of queries, not rows of a
        handful of points. Runtimes spent most of the decoder's time in element-wise work over such short
        rows: one D-FINE-N layer at batch 8 (micro-benchmarks, 2 threads) went from 6-10 to ~3 ms in
        OpenVINO and from 9-11 to 4-7 ms in PyTorch. Outputs move by ~1e-6. The state-dict key changes, so a
        deployed state dict cannot load into a trainable model.
        """
        if self.deployed:
            return
        weight = self.sampling_offsets.weight.detach()  # [M * P * 2, C], rows in (M, P, xy) order
        bias = self.sampling_offsets.bias.detach()
        to_grid = 2.0 if self.method == "default" else 1.0
        scale = (self.num_points_scale.double() * self.offset_scale * to_grid)[None, :, None]  # [1, P, 1]
        grid_weight = weight.double().reshape(self.num_heads, self.total_points, 2, -1) * scale[..., None]
        grid_bias = bias.double().reshape(self.num_heads, self.total_points, 2) * scale
        self.grid_offsets = nn.Linear(
            weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            self.grid_offsets.weight.copy_(grid_weight.permute(2, 0, 1, 3).reshape(weight.shape))
            self.grid_offsets.bias.copy_(grid_bias.permute(2, 0, 1).reshape(bias.shape))
        del self.sampling_offsets
        self.deployed = True

    def _deployed_forward(
        self, query: Tensor, reference_boxes: Tensor, value_levels: Sequence[Tensor]
    ) -> Tensor:
        """:meth:`forward` after :meth:`convert_to_deploy` (same arguments and result)."""
        batch_size, num_queries = query.shape[:2]
        heads, points = self.num_heads, self.total_points
        offsets = self.grid_offsets(query).reshape(batch_size, num_queries, 2, heads * points)
        # bilinear: grid_sample's -1..1 (2 * centre - 1); discrete: the 0..1 of _gather_nearest
        if self.method == "default":
            centre = 2 * reference_boxes[..., :2, None] - 1  # [B, Q, 2, 1]
        else:
            centre = reference_boxes[..., :2, None]
        grid = centre + offsets * reference_boxes[..., 2:, None]  # [B, Q, 2, M * P]
        grid = grid.reshape(batch_size, num_queries, 2, heads, points).permute(0, 3, 4, 1, 2)
        grid = grid.reshape(batch_size * heads, points, num_queries, 2)  # [B * M, P, Q, 2]
        weights = F.softmax(self.attention_weights(query).reshape(batch_size, num_queries, heads, points), -1)
        weights = weights.permute(0, 2, 3, 1).reshape(batch_size * heads, 1, points, num_queries)
        output: Tensor | None = None
        level_grids = grid.split(list(self.num_points_list), dim=1)
        level_weights = weights.split(list(self.num_points_list), dim=2)
        for value, level_grid, level_weight in zip(value_levels, level_grids, level_weights, strict=True):
            if self.method == "default":
                dtype = torch.promote_types(value.dtype, level_grid.dtype)
                sampled = F.grid_sample(
                    value.to(dtype), level_grid.to(dtype), padding_mode="zeros", align_corners=False
                )
            else:
                sampled = _gather_nearest(value, level_grid)  # its "queries" are points here, and back
            weighted = (sampled * level_weight).flatten(0, 1)  # [B * M * D, P_l, Q]
            # The sum over points as a product with a row of ones: OpenVINO's ReduceSum over a middle axis
            # took over twice as long as the whole multiply before it (a wash in PyTorch).
            ones = weighted.new_ones(1, weighted.shape[1])
            level_sum = torch.matmul(ones, weighted).squeeze(1)  # [B * M * D, Q]
            output = level_sum if output is None else output + level_sum
        assert output is not None, "MSDeformableAttention has at least one level"
        return output.reshape(batch_size, -1, num_queries).permute(0, 2, 1)

    def forward(self, query: Tensor, reference_boxes: Tensor, value_levels: Sequence[Tensor]) -> Tensor:
        """Attend from each query to the points around its reference box.

        Args:
            query: [B, Q, C] queries (with positional embedding added).
            reference_boxes: [B, Q, 4] cxcywh in 0..1 of the image (shared by all levels).
            value_levels: per level [B * M, C / M, H_l, W_l] (see :func:`split_value_levels`).

        Returns:
            [B, Q, C] attended features.
        """
        if reference_boxes.shape[-1] != 4:
            raise ValueError(
                f"reference_boxes must be [B, Q, 4] cxcywh, got shape {list(reference_boxes.shape)}"
            )
        if self.deployed:
            return self._deployed_forward(query, reference_boxes, value_levels)
        batch_size, num_queries = query.shape[:2]
        offsets = self.sampling_offsets(query).reshape(batch_size, num_queries, self.num_heads, -1, 2)
        weights = self.attention_weights(query).reshape(batch_size, num_queries, self.num_heads, -1)
        weights = F.softmax(weights, dim=-1)  # [B, Q, M, P]
        boxes = reference_boxes[:, :, None, None, :]  # [B, Q, 1, 1, 4]
        point_scale = self.num_points_scale.to(dtype=query.dtype)[:, None]  # [P, 1]
        locations = (
            boxes[..., :2] + offsets * point_scale * boxes[..., 2:] * self.offset_scale
        )  # [B, Q, M, P, 2]
        return deformable_sampling(value_levels, locations, weights, self.num_points_list, self.method)
