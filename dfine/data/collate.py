"""Batching: stack images, keep targets as a list, D-FINE's multi-scale training and DEIM's batch MixUp."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dfine.config.registry import COLLATORS, ConfigError
from dfine.data.epoch import SharedEpoch

__all__ = ["BatchImageCollateFunction", "mixup", "multi_scale_sizes"]


def multi_scale_sizes(base_size: int, base_size_repeat: int) -> list[int]:
    """The square input sizes multi-scale training draws from, each equally likely per batch.

    Steps of 32 from 0.75 x ``base_size`` up to just below it, ``base_size`` itself ``base_size_repeat`` times
    (so the nominal size dominates), then steps of 32 down from 1.25 x ``base_size`` (the original's table:
    640 gives 480..608, 640 x repeat, 800..672).

    Raises:
        ValueError: ``base_size`` is not a positive multiple of 32 or ``base_size_repeat`` is negative.
    """
    if base_size <= 0 or base_size % 32:
        raise ValueError(
            f"base_size must be a positive multiple of 32 for multi-scale training, got {base_size}."
        )
    if base_size_repeat < 0:
        raise ValueError(f"base_size_repeat must be >= 0, got {base_size_repeat}.")
    smallest = int(base_size * 0.75 / 32) * 32
    largest = int(base_size * 1.25 / 32) * 32
    steps = (base_size - smallest) // 32
    below = [smallest + 32 * i for i in range(steps)]
    above = [largest - 32 * i for i in range(steps)]
    return below + [base_size] * base_size_repeat + above


# per-box target entries MixUp concatenates (the others, image_id / orig_size, stay the image's own)
_PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")


def mixup(
    images: Tensor, targets: Sequence[dict[str, Any]], weight: float
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Blend every image with the previous one in the batch (image 0 with the last), DEIM's batch MixUp.

    Args:
        images: float32 [B, 3, H, W].
        targets: B dicts (see `dfine.data.base.Target`).
        weight: share ``w`` of each image's own pixels; its partner gets ``1 - w``.

    Returns:
        ``(w * images + (1 - w) * partners, targets)`` where image ``i``'s target holds its own boxes and
        labels followed by its partner's, and ``mixup`` float32 [N_i + N_partner]: ``w`` for its own boxes,
        ``1 - w`` for the partner's (they sum to 1 over one box of each). ``image_id``, ``orig_size`` and
        other per-image entries stay image ``i``'s; the input targets are not modified.
    """
    partners = [targets[-1], *targets[:-1]]  # the same order as images.roll(1, dims=0)
    mixed = images.roll(shifts=1, dims=0) * (1.0 - weight) + images * weight
    mixed_targets = []
    for own, partner in zip(targets, partners, strict=True):
        target = dict(own)
        for key in _PER_BOX_KEYS:
            if key in own and key in partner:
                target[key] = torch.cat([own[key], partner[key]])
        own_weight = torch.full((len(own["labels"]),), weight, dtype=torch.float32)
        partner_weight = torch.full((len(partner["labels"]),), 1.0 - weight, dtype=torch.float32)
        target["mixup"] = torch.cat([own_weight, partner_weight])
        mixed_targets.append(target)
    return mixed, mixed_targets


@COLLATORS.register()
class BatchImageCollateFunction:
    """Collate ``(image, target)`` samples into ``(images [B, 3, H, W], [target, ...])``.

    With ``base_size_repeat`` set, every batch before ``stop_epoch`` is resized (nearest neighbour, as the
    original) to a size drawn from `multi_scale_sizes`; normalised boxes need no change. With ``mixup_prob``
    set (DEIM's Dense O2O), a batch in epochs ``[mixup_epochs[0], mixup_epochs[-1])`` is mixed by `mixup`
    with that probability, with a weight drawn from [0.45, 0.55] (6 decimals, as DEIM); training loaders only.

    Args:
        stop_epoch: multi-scale is off from this epoch on (None: never off).
        ema_restart_decay: read by the trainer (EMA decay after the stage-2 restart); kept here because the
            original configs put it in this block. Not used for batching.
        base_size: nominal input size in pixels (a multiple of 32).
        base_size_repeat: how many times ``base_size`` appears among the sizes; None turns multi-scale off.
        mixup_prob: chance that a batch is mixed (0: MixUp off).
        mixup_epochs: ``[start, stop)`` epochs of MixUp.
    """

    def __init__(
        self,
        stop_epoch: int | None = None,
        ema_restart_decay: float = 0.9999,
        base_size: int = 640,
        base_size_repeat: int | None = None,
        mixup_prob: float = 0.0,
        mixup_epochs: Sequence[int] = (0, 0),
    ) -> None:
        if not 0.0 <= mixup_prob <= 1.0:
            raise ConfigError(f"collate_fn.mixup_prob must be in [0, 1], got {mixup_prob!r}; DEIM uses 0.5.")
        if isinstance(mixup_epochs, str) or not isinstance(mixup_epochs, Sequence) or len(mixup_epochs) < 1:
            raise ConfigError(
                f"collate_fn.mixup_epochs must be [start, stop], got {mixup_epochs!r}; e.g. [4, 29]."
            )
        self.mixup_prob = float(mixup_prob)
        self.mixup_epochs = (int(mixup_epochs[0]), int(mixup_epochs[-1]))
        self.stop_epoch = stop_epoch
        self.ema_restart_decay = ema_restart_decay
        self.base_size = base_size
        self.base_size_repeat = base_size_repeat
        self.scales = multi_scale_sizes(base_size, base_size_repeat) if base_size_repeat is not None else None
        self._epoch = SharedEpoch()

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    def multi_scale_active(self, epoch: int | None = None) -> bool:
        epoch = self.epoch if epoch is None else epoch
        return self.scales is not None and (self.stop_epoch is None or epoch < self.stop_epoch)

    def mixup_active(self, epoch: int | None = None) -> bool:
        """Whether MixUp may mix batches at ``epoch`` (it then mixes each with probability ``mixup_prob``)."""
        epoch = self.epoch if epoch is None else epoch
        return self.mixup_prob > 0 and self.mixup_epochs[0] <= epoch < self.mixup_epochs[1]

    def __call__(self, items: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
        """Stack a list of samples.

        Returns:
            images: float32 [B, 3, H, W] in 0..1; targets: list of B dicts (see `dfine.data.base.Target`).

        Raises:
            ValueError: the images differ in size (the pipeline needs a final ``Resize``).
        """
        sizes = {tuple(image.shape) for image, _ in items}
        if len(sizes) > 1:
            raise ValueError(
                f"images in one batch have different sizes {sorted(sizes)}; end the transforms with a "
                "Resize to a fixed size (e.g. {type: Resize, size: [640, 640]})."
            )
        images = torch.stack([image for image, _ in items])
        targets = [target for _, target in items]
        # drawn first whatever the epoch, as DEIM does (so a seed gives its sequence); no draw with MixUp off,
        # so D-FINE configs keep their multi-scale sequence
        if self.mixup_prob > 0 and random.random() < self.mixup_prob and self.mixup_active():
            images, targets = mixup(images, targets, round(random.uniform(0.45, 0.55), 6))
        if self.multi_scale_active():
            size = random.choice(self.scales)
            if images.shape[-2:] != (size, size):
                images = F.interpolate(images, size=(size, size))
        return images, targets

    def __repr__(self) -> str:
        return (
            f"BatchImageCollateFunction(base_size={self.base_size}, "
            f"base_size_repeat={self.base_size_repeat}, stop_epoch={self.stop_epoch}, "
            f"mixup_prob={self.mixup_prob}, mixup_epochs={list(self.mixup_epochs)})"
        )
