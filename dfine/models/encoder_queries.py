"""Anchors on the encoder's feature cells and the top-k selection that turns cells into decoder queries."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["QUERY_SELECT_METHODS", "make_anchors", "select_top_queries"]

QUERY_SELECT_METHODS: tuple[str, ...] = ("default", "agnostic", "one2many")


def make_anchors(
    spatial_shapes: Sequence[tuple[int, int]],
    eps: float = 1e-2,
    grid_size: float = 0.05,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """One anchor box per feature cell, centred on the cell, ``grid_size * 2**level`` wide and high.

    Args:
        spatial_shapes: (H_l, W_l) per level, finest first.
        eps: anchors with any coordinate outside (eps, 1 - eps) are invalid.
        grid_size: anchor side on level 0, as a fraction of the image.
        device: where to create them.

    Returns:
        ``(anchors, valid_mask)``: [1, S, 4] inverse-sigmoid cxcywh (``inf`` where invalid) and
        [1, S, 1] bool, S = sum of H_l * W_l, cells row-major per level.
    """
    levels = []
    for level, (height, width) in enumerate(spatial_shapes):
        rows, columns = torch.meshgrid(
            torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
        )
        size = torch.tensor([width, height], dtype=torch.float32, device=device)
        centres = (torch.stack((columns, rows), dim=-1) + 0.5) / size  # [H, W, 2] in 0..1
        sides = torch.full_like(centres, grid_size * 2.0**level)
        levels.append(torch.cat((centres, sides), dim=-1).reshape(1, height * width, 4))
    anchors = torch.cat(levels, dim=1)
    valid_mask = ((anchors > eps) & (anchors < 1 - eps)).all(dim=-1, keepdim=True)
    logits = torch.log(anchors / (1 - anchors))
    return torch.where(valid_mask, logits, torch.inf), valid_mask


def select_top_queries(
    memory: Tensor,
    logits: Tensor,
    anchors: Tensor,
    num_queries: int,
    method: str = "default",
    gather_logits: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Keep the ``num_queries`` highest-scoring encoder cells.

    Args:
        memory: [B, S, D] encoder features.
        logits: [B, S, C] class logits (``"agnostic"``: [B, S, 1]).
        anchors: [1 or B, S, 4] inverse-sigmoid anchor boxes.
        num_queries: Q cells to keep.
        method: ``"default"`` ranks cells by their best class, ``"agnostic"`` by the single logit,
            ``"one2many"`` ranks (cell, class) pairs, so a cell can be picked more than once.
        gather_logits: also return the selected logits (training needs them for the encoder loss).

    Returns:
        ``(memory [B, Q, D], logits [B, Q, C] or None, anchors [B, Q, 4])``.

    Raises:
        ValueError: fewer than ``num_queries`` cells, or an unknown method.
    """
    batch_size, num_cells, _ = memory.shape
    if num_queries > num_cells:
        raise ValueError(
            f"num_queries={num_queries} is more than the {num_cells} encoder cells of this input; "
            "use larger images or fewer queries"
        )
    if method == "default":
        index = logits.max(dim=-1).values.topk(num_queries, dim=-1).indices
    elif method == "agnostic":
        index = logits.squeeze(-1).topk(num_queries, dim=-1).indices
    elif method == "one2many":
        index = logits.flatten(1).topk(num_queries, dim=-1).indices // logits.shape[-1]
    else:
        raise ValueError(f"query_select_method {method!r} is not one of {QUERY_SELECT_METHODS}")
    index = index.unsqueeze(-1)  # [B, Q, 1]
    top_anchors = anchors.expand(batch_size, -1, -1).gather(1, index.expand(-1, -1, anchors.shape[-1]))
    top_memory = memory.gather(1, index.expand(-1, -1, memory.shape[-1]))
    top_logits = logits.gather(1, index.expand(-1, -1, logits.shape[-1])) if gather_logits else None
    return top_memory, top_logits, top_anchors
