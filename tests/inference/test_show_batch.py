"""--show-batch with DEIM's recipe: pictures from the first epoch that mixes, MixUp weights on the boxes."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dfine.data.collate import BatchImageCollateFunction, mixup
from dfine.data.compose import Compose
from dfine.inference.show_batch import draw_batch, first_mixing_epoch


def loader(policy_epoch: object, mixup_prob: float) -> SimpleNamespace:
    policy = {"name": "stop_epoch", "epoch": policy_epoch, "ops": []}
    collate = BatchImageCollateFunction(mixup_prob=mixup_prob, mixup_epochs=[3, 29])
    return SimpleNamespace(dataset=SimpleNamespace(transforms=Compose([], policy)), collate_fn=collate)


def test_first_mixing_epoch_is_where_mosaic_or_mixup_starts() -> None:
    assert first_mixing_epoch(loader([4, 29, 50], 0.5)) == 3
    assert first_mixing_epoch(loader([4, 29, 50], 0.0)) == 4
    assert first_mixing_epoch(loader(72, 0.0)) == 0  # D-FINE's recipe: epoch 0 as before


def test_a_mixed_batch_is_drawn_with_all_boxes() -> None:
    images = torch.zeros(2, 3, 32, 32)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "labels": torch.tensor([i])} for i in range(2)]
    mixed, mixed_targets = mixup(images, targets, 0.5)
    grid = draw_batch(mixed, mixed_targets, ["circle", "square"])
    plain = draw_batch(images, targets, ["circle", "square"])
    assert grid.shape == plain.shape and grid.dtype == torch.uint8
    assert len(mixed_targets[0]["labels"]) == 2 and not torch.equal(grid, plain)
