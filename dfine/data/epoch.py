"""The training epoch as seen from data-loader workers, and per-epoch reseeding of their random generators.

Augmentation switches off at a given epoch (the stop-epoch policy, multi-scale's ``stop_epoch``). Worker
processes hold copies of the dataset and the collate function, and persistent workers never see attributes set
on the main process's copies, so the epoch lives in a one-element shared-memory tensor that every copy reads.

Seeding each worker from ``(seed, epoch, worker id)`` at the first sample of every epoch makes an epoch's
augmentation a pure function of those numbers: a run resumed at epoch k draws what the uninterrupted run drew,
with or without persistent workers.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["SharedEpoch", "WorkerReseeder", "mix_seed"]


class SharedEpoch:
    """An int shared by the main process and all data-loader workers (-1 until the trainer sets it)."""

    def __init__(self, epoch: int = -1) -> None:
        self._value = torch.full((1,), epoch, dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self._value[0])

    def set(self, epoch: int) -> None:
        self._value[0] = int(epoch)


def mix_seed(*numbers: int) -> int:
    """A well-spread 63-bit seed from several ints (e.g. seed, rank, epoch, worker id)."""
    state = np.random.SeedSequence([int(n) % (1 << 63) for n in numbers]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class WorkerReseeder:
    """Reseed ``random``, ``numpy`` and ``torch`` inside a worker process when the epoch changes.

    ``seed`` None (a dataset used outside `build_dataloader`) leaves the generators as PyTorch seeded them.
    In the main process (``num_workers=0``) nothing is reseeded: the trainer owns those generators.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._seeded_epoch: int | None = None

    def __call__(self, epoch: int) -> None:
        if self.seed is None or epoch == self._seeded_epoch:
            return
        info = get_worker_info()
        if info is None:
            return
        self._seeded_epoch = epoch
        value = mix_seed(self.seed, epoch + 1, info.id)
        random.seed(value)
        np.random.seed(value % (1 << 32))
        torch.manual_seed(value)
