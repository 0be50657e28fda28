"""Matched (query, target) pairs of a batch as flat index tensors, the GO-LSD union and the denoising pairs.

The matcher answers per image on the host; the losses want flat device tensors over the batch.
:func:`to_device` packs every output's pairs (and the union, and the denoising pairs' host-known parts) into
one tensor and moves it with a single host->device copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dfine.losses.matcher import ImageMatch

__all__ = ["Matching", "Pairs", "denoising_matches", "to_device", "union_of_matches"]


@dataclass(frozen=True)
class Pairs:
    """Matched pairs of one output, flattened over the batch.

    Attributes:
        batch_index: [K] int64, image of each pair.
        query_index: [K] int64, matched query.
        target_index: [K] int64, index into the batch's concatenated targets (image 0's first).
    """

    batch_index: Tensor
    query_index: Tensor
    target_index: Tensor

    def __len__(self) -> int:
        return int(self.batch_index.shape[0])


@dataclass(frozen=True)
class Matching:
    """Every assignment one criterion call uses.

    Attributes:
        own: each matched output's own Hungarian pairs, keyed ``main``, ``aux_0``.., ``pre``, ``enc_0``..
            (they supervise the class terms).
        union: the GO-LSD union of all those matches (it supervises the box and localization terms).
        denoising: pairs of the positive denoising queries with the targets they were made from, or None.
    """

    own: dict[str, Pairs]
    union: Pairs
    denoising: Pairs | None


def union_of_matches(matches: Sequence[list[ImageMatch]]) -> list[ImageMatch]:
    """GO-LSD's union of several outputs' matches, per image.

    Each distinct (query, target) pair is ranked by how many outputs chose it; walking that ranking, a query
    keeps the first target it meets. Ranking uses ``torch.unique`` + ``torch.argsort`` on CPU exactly as the
    original does, so ties between equally frequent pairs resolve the same way and the losses stay identical
    (CPU ``argsort`` is not stable, so a stable sort would not).

    Args:
        matches: G lists of B ``(query_index, target_index)`` CPU pairs.

    Returns:
        B ``(query_index, target_index)`` pairs, in ranking order, each query at most once.
    """
    result: list[ImageMatch] = []
    for per_output in zip(*matches, strict=True):
        queries = torch.cat([query for query, _ in per_output])
        targets = torch.cat([target for _, target in per_output])
        if queries.numel() == 0:
            result.append((queries, targets))
            continue
        unique, counts = torch.unique(torch.stack((queries, targets), dim=1), return_counts=True, dim=0)
        ranked = unique[torch.argsort(counts, descending=True)]  # [M, 2]
        _, first = np.unique(ranked[:, 0].numpy(), return_index=True)
        kept = ranked[torch.from_numpy(np.sort(first))]
        result.append((kept[:, 0].contiguous(), kept[:, 1].contiguous()))
    return result


def denoising_matches(
    dn_meta: Mapping[str, object], sizes: Sequence[int]
) -> tuple[list[Tensor], list[Tensor]]:
    """Positive denoising queries and their targets.

    Group ``g`` of image ``b`` holds one noised copy of each of the image's targets, in order, so target ``n``
    is repeated ``dn_num_group`` times.

    Args:
        dn_meta: the model's ``dn_meta``: ``dn_positive_idx`` (B [N_b * groups] int64 tensors) and
            ``dn_num_group``.
        sizes: number of targets of each image.

    Returns:
        ``(queries, targets)``: per image, the query indices (on the model's device) and the per-image target
        indices (CPU int64).
    """
    positive = dn_meta["dn_positive_idx"]
    groups = int(dn_meta["dn_num_group"])  # type: ignore[call-overload]
    if not isinstance(positive, Sequence):
        raise TypeError(
            f"dn_meta['dn_positive_idx'] must be a list of per-image tensors, got {type(positive)}."
        )
    if len(positive) != len(sizes):
        raise ValueError(
            f"dn_meta['dn_positive_idx'] has {len(positive)} entries for a batch of {len(sizes)} images."
        )
    queries, targets = [], []
    for image, (indices, size) in enumerate(zip(positive, sizes, strict=True)):
        if indices.numel() != size * groups:
            raise ValueError(
                f"dn_meta['dn_positive_idx'][{image}] has {indices.numel()} queries but image {image} has "
                f"{size} targets x {groups} denoising groups; are targets and outputs from different batches?"
            )
        queries.append(indices.reshape(-1).long())
        targets.append(torch.arange(size, dtype=torch.int64).repeat(groups))
    return queries, targets


def _flat(matches: Sequence[ImageMatch], offsets: Sequence[int]) -> Tensor:
    """[3, K] CPU (batch, query, target-in-batch) of per-image pairs."""
    columns = []
    for image, ((query, target), offset) in enumerate(zip(matches, offsets, strict=True)):
        columns.append(torch.stack((torch.full_like(query, image), query, target + offset)))
    return torch.cat(columns, dim=1) if columns else torch.zeros(3, 0, dtype=torch.int64)


def to_device(
    own: Mapping[str, Sequence[ImageMatch]],
    union: Sequence[ImageMatch],
    denoising: tuple[list[Tensor], list[Tensor]] | None,
    sizes: Sequence[int],
    device: torch.device,
) -> Matching:
    """Flatten per-image pairs over the batch and move them to ``device`` in one copy."""
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist() if sizes else []
    blocks = [_flat(matches, offsets) for matches in own.values()] + [_flat(union, offsets)]
    if denoising is not None:
        # the queries are already on the device; stack placeholders so the host-made columns travel together
        dn_queries, dn_targets = denoising
        blocks.append(_flat([(torch.zeros_like(t), t) for t in dn_targets], offsets))
    packed = torch.cat(blocks, dim=1).to(device, non_blocking=True)
    pieces = iter(packed.split([block.shape[1] for block in blocks], dim=1))
    own_pairs = {name: Pairs(*next(pieces).unbind(0)) for name in own}
    union_pairs = Pairs(*next(pieces).unbind(0))
    denoising_pairs = None
    if denoising is not None:
        batch_index, _, target_index = next(pieces).unbind(0)
        query_index = torch.cat([q.to(device) for q in dn_queries]) if dn_queries else batch_index
        denoising_pairs = Pairs(batch_index, query_index, target_index)
    return Matching(own_pairs, union_pairs, denoising_pairs)
