"""Where a run's numbers go: ``metrics.jsonl`` (one line per epoch), TensorBoard (or MLflow / W&B), the epoch
summary line of the log, and the progress of each epoch (:class:`EpochProgress`).

Only rank 0 writes; on other ranks a :class:`RunLog` is built with ``enabled=False`` and every call returns at
once, so the trainer calls it unconditionally.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor
from tqdm import tqdm

from dfine.engine.loggers import check_loggers, open_loggers

__all__ = ["EpochProgress", "RunLog", "format_epoch_record", "json_safe", "peak_memory_mb"]

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
        loggers: the config's ``loggers`` (default TensorBoard only; see :mod:`dfine.engine.loggers`).
        cfg: the resolved config, logged as params by MLflow / W&B.
    """

    def __init__(
        self,
        output_dir: str | Path,
        summary_dir: str | Path | None = None,
        enabled: bool = True,
        loggers: Sequence[str] | None = None,
        cfg: Mapping[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.summary_dir = Path(summary_dir) if summary_dir else Path(output_dir) / "summary"
        self.loggers = check_loggers(loggers)  # a typo or a missing package fails before training starts
        self.cfg = cfg or {}
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        """The configured trackers as one ``SummaryWriter``-like writer, opened on first use."""
        if self._writer is None:
            self._writer = open_loggers(self.loggers, self.metrics_path.parent, self.summary_dir, self.cfg)
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# The epoch summary shows these; every term is in metrics.jsonl / TensorBoard.
_SUMMARY_KEYS = (
    ("loss", "loss", "{:.4g}"),
    ("loss_vfl", "vfl", "{:.4g}"),
    ("loss_bbox", "l1", "{:.4g}"),
    ("loss_giou", "giou", "{:.4g}"),
    ("loss_fgl", "fgl", "{:.4g}"),
    ("loss_ddf_aux_0", "ddf", "{:.4g}"),
    ("lr", "lr", "{:.2e}"),
    ("val_AP", "AP", "{:.4f}"),
    ("val_AP50", "AP50", "{:.4f}"),
    ("val_best_f1", "F1", "{:.3f}"),
    ("time", "time", "{:.0f}s"),
    ("images_per_s", "img/s", "{:.1f}"),
    ("memory_mb", "mem", "{:.0f}MB"),
    ("failed_samples", "failed loads", "{:.0f}"),  # shown only when some failed
)


def format_epoch_record(record: Mapping[str, Any]) -> str:
    """The log's one-line summary of an epoch record: ``stage 1 | loss 41.2 | vfl 0.91 | ... | mem 900MB``."""
    parts = [f"stage {record.get('stage', 1)}"]
    for key, label, form in _SUMMARY_KEYS:
        value = record.get(key)
        if key == "failed_samples" and not value:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {form.format(value)}")
    return " | ".join(parts)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class EpochProgress:
    """Progress through one epoch's batches: a tqdm bar on a terminal, plain log lines otherwise.

    When ``stream`` is not a terminal (a SLURM log file, a pipe) a bar would leave every redrawn frame in the
    file, joined by ``\\r``; instead every ``print_freq``-th batch logs one line at INFO, e.g.
    ``epoch 3/71 step 200/1250: loss 21.4 lr 2.50e-04 img/s 48.1 eta 0:05:12`` (eta: to the epoch's end).

    Args:
        batches: the epoch's loader (``len`` gives the number of batches).
        epoch: this epoch (0-based); ``epochs`` the run's total.
        print_freq: batches between plain log lines.
        enabled: ``False`` on ranks other than 0 (no bar, no lines).
        stream: where the bar is drawn; default ``sys.stderr`` (looked up when the progress is made).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        epoch: int,
        epochs: int,
        print_freq: int,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        stream = sys.stderr if stream is None else stream
        self.interactive = enabled and _is_terminal(stream)
        self.plain_lines = enabled and not self.interactive
        self.epoch, self.epochs = epoch, epochs
        self.total = len(batches)  # type: ignore[arg-type]
        self.print_freq = max(1, print_freq)
        self.start = time.time()
        self.bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{epochs - 1}",
            total=self.total,
            leave=False,
            dynamic_ncols=True,
            file=stream,
            disable=not self.interactive,
        )

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bar)

    def update(self, index: int, loss: float, lr: float, images_per_s: float) -> None:
        """Show the ``index``-th batch's (0-based) total loss, the lr it used and the throughput so far."""
        if self.interactive:
            # drawn at tqdm's own refresh interval, not forced on every step
            self.bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.2e} img/s {images_per_s:.1f}", refresh=False)
        elif self.plain_lines and (index + 1) % self.print_freq == 0:
            done = index + 1
            remaining = (time.time() - self.start) / done * (self.total - done)
            logger.info(
                "epoch %d/%d step %d/%d: loss %.4g lr %.2e img/s %.1f eta %s",
                self.epoch,
                self.epochs - 1,
                done,
                self.total,
                loss,
                lr,
                images_per_s,
                datetime.timedelta(seconds=round(remaining)),
            )

    def close(self) -> None:
        self.bar.close()
