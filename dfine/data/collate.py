"""Batching: stack images, keep targets as a list, and D-FINE's multi-scale training."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dfine.config.registry import COLLATORS
from dfine.data.epoch import SharedEpoch

__all__ = ["BatchImageCollateFunction", "multi_scale_sizes"]


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


@COLLATORS.register()
class BatchImageCollateFunction:
    """Collate ``(image, target)`` samples into ``(images [B, 3, H, W], [target, ...])``.

    With ``base_size_repeat`` set, every batch before ``stop_epoch`` is resized (nearest neighbour, as the
    original) to a size drawn from `multi_scale_sizes`; normalised boxes need no change.

    Args:
        stop_epoch: multi-scale is off from this epoch on (None: never off).
        ema_restart_decay: read by the trainer (EMA decay after the stage-2 restart); kept here because the
            original configs put it in this block. Not used for batching.
        base_size: nominal input size in pixels (a multiple of 32).
        base_size_repeat: how many times ``base_size`` appears among the sizes; None turns multi-scale off.
    """

    def __init__(
        self,
        stop_epoch: int | None = None,
        ema_restart_decay: float = 0.9999,
        base_size: int = 640,
        base_size_repeat: int | None = None,
    ) -> None:
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
        if self.multi_scale_active():
            size = random.choice(self.scales)
            if images.shape[-2:] != (size, size):
                images = F.interpolate(images, size=(size, size))
        return images, targets

    def __repr__(self) -> str:
        return (
            f"BatchImageCollateFunction(base_size={self.base_size}, "
            f"base_size_repeat={self.base_size_repeat}, stop_epoch={self.stop_epoch})"
        )
