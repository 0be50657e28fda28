"""Samples that fail to load during training: counted across loader workers, fatal only past a threshold.

One unreadable file among 1.7M must not end a multi-day run; many mean something is wrong (a storage mount
gone, a wrong folder) and the run should stop with a clear message instead of training on what is left.
The count lives in shared memory, one slot per loader worker (no lost updates between processes), so the
trainer reads the epoch's total in the main process and puts it in the epoch summary and ``metrics.jsonl``.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import get_worker_info

from dfine.data.image_io import UnreadableImageError

__all__ = ["SampleFailures", "TooManyFailedSamplesError"]

logger = logging.getLogger(__name__)

_SLOTS = 257  # the main process, then one per loader worker (ids wrap beyond 256 workers)


class TooManyFailedSamplesError(UnreadableImageError):
    """More samples failed to load in one epoch than ``max_failed_fraction`` allows.

    A DataLoader worker's exception reaches the main process rebuilt from a text that holds the worker's
    traceback; only our own message is kept, so the command line prints one readable line.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class SampleFailures:
    """Failed loads of the current epoch, shared by the main process and all loader workers."""

    def __init__(self) -> None:
        self._counts = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()  # per process: each file is named once

    def total(self) -> int:
        return int(self._counts.sum())

    def reset(self) -> None:
        self._counts.zero_()

    def record(self, path: str, error: BaseException, allowed: float, num_samples: int) -> None:
        """Count one failure; warn naming ``path`` the first time; raise past ``allowed`` failures.

        Raises:
            TooManyFailedSamplesError: the epoch's failures exceed ``allowed``.
        """
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_SLOTS - 1)
        self._counts[slot] += 1
        total = self.total()
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("skipped a sample that failed to load (another one is used): %s", error)
        if total > allowed:
            raise TooManyFailedSamplesError(
                f"{total} samples failed to load this epoch, more than max_failed_fraction allows "
                f"({allowed:g} of {num_samples}); the last: {error}. Run dfine-train --check-data to list "
                "broken files, fix or remove them, or raise the dataset's max_failed_fraction."
            )
