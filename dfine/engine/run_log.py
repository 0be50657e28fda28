"""Where a run's numbers go: ``metrics.jsonl`` (one line per epoch) and TensorBoard event files.

Only rank 0 writes; on other ranks a :class:`RunLog` is built with ``enabled=False`` and every call returns at
once, so the trainer calls it unconditionally.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["RunLog", "json_safe"]

logger = logging.getLogger(__name__)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and tensors as numbers, so the line is strict JSON."""
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunLog:
    """Per-epoch ``metrics.jsonl`` plus TensorBoard scalars and images under ``summary_dir``.

    Args:
        output_dir: the run folder; ``metrics.jsonl`` is written there.
        summary_dir: TensorBoard folder (the original's ``summary_dir``); default ``output_dir/summary``.
        enabled: ``False`` on ranks other than 0.
    """

    def __init__(
        self, output_dir: str | Path, summary_dir: str | Path | None = None, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.summary_dir = Path(summary_dir) if summary_dir else Path(output_dir) / "summary"
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        """The TensorBoard ``SummaryWriter``, opened on first use (it creates the event file)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when logging

            self._writer = SummaryWriter(str(self.summary_dir))
        return self._writer

    def restart(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` from ``history``: after a resume, epochs the checkpoint never saw go."""
        if not self.enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(json_safe(record)) + "\n" for record in history]
        self.metrics_path.write_text("".join(lines), encoding="utf-8")

    def step(
        self, global_step: int, losses: Mapping[str, float], lrs: Sequence[float], images_per_s: float
    ) -> None:
        """Scalars of one optimizer step: every loss term, the lr of each parameter group and throughput."""
        if not self.enabled:
            return
        writer = self.writer
        for name, value in losses.items():
            writer.add_scalar(f"train/{name}", value, global_step)
        writer.add_scalar("train/loss", sum(losses.values()), global_step)
        for index, lr in enumerate(lrs):
            writer.add_scalar(f"lr/group_{index}", lr, global_step)
        writer.add_scalar("train/images_per_s", images_per_s, global_step)

    def epoch(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` and put its numbers in TensorBoard at its epoch."""
        if not self.enabled:
            return
        with self.metrics_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(json_safe(record)) + "\n")
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key == "epoch" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            group = "val" if key.startswith("val_") else "epoch"
            self.writer.add_scalar(f"{group}/{key.removeprefix('val_')}", value, epoch)
        self.writer.flush()

    def images(self, tag: str, images: Sequence[Tensor], epoch: int) -> None:
        """uint8 [3, H, W] pictures under ``tag/0``, ``tag/1``, ... at ``epoch``."""
        if not self.enabled:
            return
        for index, image in enumerate(images):
            self.writer.add_image(f"{tag}/{index}", image, epoch, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
