"""Data loaders from a config block (``train_dataloader`` / ``val_dataloader``), for one process or DDP.

The block is the original D-FINE's, unchanged::

    train_dataloader:
      type: DataLoader
      dataset: {type: CocoDetection, img_folder: ..., ann_file: ..., transforms: {type: Compose, ops: [...]}}
      shuffle: True
      num_workers: 4
      drop_last: True
      collate_fn: {type: BatchImageCollateFunction, base_size: 640, base_size_repeat: 3, stop_epoch: 72}
      total_batch_size: 32

Shared values are passed by the caller: ``num_classes`` (checked against the annotation file), the world
size and rank (per-rank batch = ``total_batch_size / world_size``) and the seed (shuffling and augmentation
are a pure function of seed, rank and epoch, so ``--seed`` reproduces a run and resuming at epoch k sees what
the uninterrupted run saw).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils.data
from torch.utils.data import DistributedSampler, Sampler

from dfine.config.registry import COLLATORS, DATASETS, ConfigError, did_you_mean
from dfine.data.compose import build_transforms
from dfine.data.epoch import mix_seed

__all__ = ["DataLoader", "ShardSampler", "build_dataloader", "check_dataloader_block", "per_rank_batch_size"]

# Keys of a loader block, with their defaults (None: required or computed).
_LOADER_KEYS: dict[str, Any] = {
    "type": "DataLoader",
    "dataset": None,
    "shuffle": False,
    "num_workers": 0,
    "drop_last": False,
    "collate_fn": {"type": "BatchImageCollateFunction"},
    "total_batch_size": None,
    "batch_size": None,
    "pin_memory": None,
    "persistent_workers": None,
    "prefetch_factor": None,
}


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` forwarding the epoch to its sampler, dataset and collate function."""

    epoch: int = -1

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: reshuffles (seed + epoch), applies the stop-epoch policy and multi-scale's
        ``stop_epoch``, and makes the workers reseed from ``(seed, rank, epoch)``."""
        self.epoch = epoch
        for part in (self.sampler, self.dataset, self.collate_fn):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: every sample exactly once over all ranks (no padding), for
    distributed evaluation where a duplicated image would be counted twice."""

    def __init__(self, length: int, world_size: int, rank: int) -> None:
        self.length, self.world_size, self.rank = length, world_size, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def per_rank_batch_size(block: Mapping[str, Any], world_size: int, where: str = "") -> int:
    """Batch size of one process: ``total_batch_size / world_size``, or ``batch_size`` as given.

    Raises:
        ConfigError: both or neither key set, a value below 1, or a total not divisible by the world size.
    """
    total, per_rank = block.get("total_batch_size"), block.get("batch_size")
    if (total is None) == (per_rank is None):
        raise ConfigError(
            f"{where}: set exactly one of total_batch_size (all processes together, e.g. 32) or batch_size "
            f"(per process); got total_batch_size={total}, batch_size={per_rank}."
        )
    if total is not None:
        if not isinstance(total, int) or total < 1:
            raise ConfigError(f"{where}.total_batch_size must be a positive int (e.g. 32), got {total!r}.")
        if total % world_size:
            lower = total // world_size * world_size
            raise ConfigError(
                f"{where}.total_batch_size {total} is not divisible by the number of processes {world_size}; "
                f"use {lower or world_size} or {lower + world_size} (e.g. -u {_key(where)}.total_batch_size="
                f"{lower + world_size})."
            )
        return total // world_size
    if not isinstance(per_rank, int) or per_rank < 1:
        raise ConfigError(f"{where}.batch_size must be a positive int, got {per_rank!r}.")
    return per_rank


def check_dataloader_block(block: Mapping[str, Any], where: str = "") -> None:
    """Validate a loader block without touching any file: keys, types, transforms and collate arguments.

    Raises:
        ConfigError: naming the key path and the closest valid name.
    """
    _check_keys(block, where)
    build_transforms(block["dataset"].get("transforms"), where=f"{where}.dataset.transforms")
    COLLATORS.build(block.get("collate_fn") or _LOADER_KEYS["collate_fn"], where=f"{where}.collate_fn")


def _check_keys(block: Mapping[str, Any], where: str) -> None:
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {block!r}.")
    for key in block:
        if key not in _LOADER_KEYS:
            raise ConfigError(
                f"{where}.{key} is not a data-loader setting.{did_you_mean(key, _LOADER_KEYS)} "
                f"Settings: {', '.join(sorted(_LOADER_KEYS))}."
            )
    if block.get("type", "DataLoader") != "DataLoader":
        raise ConfigError(f"{where}.type must be DataLoader, got {block['type']!r}.")
    dataset = block.get("dataset")
    if not isinstance(dataset, Mapping):
        raise ConfigError(f"{where}.dataset: expected a {{type: CocoDetection, ...}} block, got {dataset!r}.")
    DATASETS.check_block(dataset, f"{where}.dataset", provided=("num_classes",))


def build_dataloader(
    block: Mapping[str, Any],
    *,
    split: str = "train",
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    num_classes: int | None = None,
    where: str = "",
) -> DataLoader:
    """Build the dataset, transforms, collate function, sampler and loader of a config block.

    Args:
        block: the config's ``train_dataloader`` or ``val_dataloader`` mapping (see the module docstring).
        split: ``train`` or ``val``. Training loaders use a ``DistributedSampler`` (also for one process:
            the order is then a pure function of seed and epoch); under DDP, ``val`` loaders shard without
            padding (`ShardSampler`) so each image is evaluated exactly once.
        world_size, rank: the process group (1, 0 for a single process).
        seed: the run's seed (``--seed``).
        num_classes: the config's top-level ``num_classes``, checked against the annotation file.
        where: ``config-file: train_dataloader``, used in error messages.

    Returns:
        A `DataLoader` whose batches are ``(images float32 [B, 3, H, W] in 0..1, list of B targets)``; call
        ``loader.set_epoch(epoch)`` before each training epoch.

    Raises:
        ConfigError: an unknown key (with the closest valid one), a batch size not divisible by the world
            size, ``num_classes`` smaller than the dataset's categories, a missing annotation file, ...
    """
    where = where or f"{split}_dataloader"
    _check_keys(block, where)
    batch_size = per_rank_batch_size(block, world_size, where)
    dataset_block = dict(block["dataset"])
    transforms = build_transforms(dataset_block.pop("transforms", None), where=f"{where}.dataset.transforms")
    dataset = DATASETS.build(
        {**dataset_block, "transforms": transforms}, where=f"{where}.dataset", num_classes=num_classes
    )
    collate_fn = COLLATORS.build(
        block.get("collate_fn") or _LOADER_KEYS["collate_fn"], where=f"{where}.collate_fn"
    )
    if split != "train":
        _refuse_mixing(transforms, collate_fn, where)
    if hasattr(dataset, "reseeder"):
        dataset.reseeder.seed = mix_seed(seed, rank, 0x5EED)

    shuffle = bool(block.get("shuffle", False))
    drop_last = bool(block.get("drop_last", False))
    sampler: Sampler[int] | None = None
    if split == "train":
        # Also for one process: its order is a pure function of (seed, epoch) once set_epoch is called.
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    elif world_size > 1:
        sampler = ShardSampler(len(dataset), world_size, rank)
    if drop_last and len(sampler if sampler is not None else dataset) < batch_size:
        raise ConfigError(
            f"{where}: {len(dataset)} images on {world_size} process(es) give no full batch of {batch_size} "
            "with drop_last: True; lower total_batch_size or set drop_last: False."
        )

    num_workers = int(block.get("num_workers", 0))
    options: dict[str, Any] = {}
    if num_workers > 0:
        persistent = block.get("persistent_workers")
        options["persistent_workers"] = True if persistent is None else bool(persistent)
        if block.get("prefetch_factor") is not None:
            options["prefetch_factor"] = int(block["prefetch_factor"])
    pin_memory = block.get("pin_memory")
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, rank, -1))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        generator=generator,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        **options,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the training process, which saves and then stops them.

    torchrun signals each worker's whole process group, loader workers included; one killed by the signal
    would make the training process fail ("DataLoader worker exited unexpectedly") before it could save.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _key(where: str) -> str:
    """``file.yml: train_dataloader`` -> ``train_dataloader`` (the dotted key for a ``-u`` override)."""
    return where.rsplit(": ", 1)[-1] if where else "train_dataloader"


def _refuse_mixing(transforms: Any, collate_fn: Any, where: str) -> None:
    """Mosaic and MixUp blend images and their boxes: a mixed batch must never be evaluated."""
    if "Mosaic" in getattr(transforms, "op_names", ()):
        raise ConfigError(
            f"{where}.dataset.transforms: Mosaic is a training augmentation; remove it from the evaluation "
            "pipeline (it would score composed images against their mixed boxes)."
        )
    if getattr(collate_fn, "mixup_prob", 0.0) > 0:
        raise ConfigError(
            f"{where}.collate_fn.mixup_prob: MixUp is a training augmentation; set it to 0 (or remove it) "
            "for evaluation."
        )
