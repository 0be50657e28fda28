"""One training step: ``autocast -> model -> criterion (fp32) -> backward -> clip -> optimizer -> EMA -> lr``.

:class:`TrainStep` owns everything that happens between two batches: mixed precision and the grad scaler,
gradient accumulation (DDP's ``no_sync`` on all but the last micro-batch), the zero-weighted term that keeps
every parameter in each rank's graph, clipping, skipping a step whose loss is not finite, and the EMA and lr
updates. The epoch loop (:mod:`dfine.engine.trainer`) only feeds it batches.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfine import distributed as dist_utils
from dfine.engine.ema import ModelEMA
from dfine.engine.run_state import RunState
from dfine.engine.schedules import LRSchedule

__all__ = ["MAX_NON_FINITE_STEPS", "NonFiniteLossError", "StepResult", "TrainStep"]

logger = logging.getLogger(__name__)

# Consecutive non-finite steps tolerated before the run stops (a single bad batch is skipped).
MAX_NON_FINITE_STEPS = 5


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses repeatedly; the last good checkpoint is untouched."""


@dataclass(frozen=True)
class StepResult:
    """What one micro-batch did.

    Attributes:
        losses: the criterion's loss terms of this micro-batch, averaged over ranks.
        optimizer_stepped: the accumulated gradients were applied (``global_step`` moved on).
    """

    losses: dict[str, float]
    optimizer_stepped: bool


def move_targets(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """``targets`` with every tensor on ``device`` (other values as they are)."""
    return [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]


class TrainStep:
    """Forward, loss, backward and (every ``grad_accum_steps`` micro-batches) the optimizer step.

    Args:
        model: the module being trained, whose state dict is saved (after SyncBN conversion, unwrapped).
        criterion: returns a dict of fp32 loss terms; their sum is minimised.
        optimizer: built over ``model``'s parameters.
        lr_schedule: stepped after every optimizer step.
        ema: updated after every optimizer step, or ``None``.
        state: the run's counters: ``epoch`` and ``global_step`` are read, ``global_step`` and
            ``step_losses`` written.
        device: where batches go.
        train_model: what the forward pass runs: the DDP wrapper of ``model``, or ``model`` itself (default).
        use_amp: autocast the forward pass to ``amp_dtype``.
        amp_dtype: ``torch.float16`` or ``torch.bfloat16``.
        scaler: the loss scaler (:func:`dfine.engine.precision.build_grad_scaler`); ``None``: a disabled one.
        grad_accum_steps: micro-batches whose gradients add up to one optimizer step.
        clip_max_norm: clip the total gradient norm to this; 0 disables clipping.
        anchor_every_parameter: add ``0 * p`` of every trainable parameter to the loss (DDP without
            ``find_unused_parameters``, see :meth:`backward`).
        checkpoint_path: the file holding the last good state, named when non-finite losses stop the run.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_schedule: LRSchedule,
        ema: ModelEMA | None,
        state: RunState,
        device: torch.device,
        train_model: nn.Module | None = None,
        use_amp: bool = False,
        amp_dtype: torch.dtype = torch.float16,
        scaler: torch.amp.GradScaler | None = None,
        grad_accum_steps: int = 1,
        clip_max_norm: float = 0.0,
        anchor_every_parameter: bool = False,
        checkpoint_path: Path | None = None,
    ) -> None:
        self.model = model
        self.train_model = model if train_model is None else train_model
        self.criterion = criterion
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.ema = ema
        self.state = state
        self.device = device
        self.use_amp = use_amp
        self.amp_dtype = amp_dtype
        self.grad_accum_steps = grad_accum_steps
        self.clip_max_norm = clip_max_norm
        self.checkpoint_path = checkpoint_path
        self.graph_anchors = (
            [p for p in model.parameters() if p.requires_grad] if anchor_every_parameter else []
        )
        # Disabled (the default), a scaler passes everything through; it still has a state to checkpoint.
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
        self.non_finite_steps = 0
        self._window_losses: list[float] = []  # total loss of each micro-batch since the last optimizer step

    @property
    def lr(self) -> float:
        """The current lr of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def __call__(self, images: Tensor, targets: list[dict[str, Any]], index: int) -> StepResult | None:
        """Train on the ``index``-th micro-batch of the epoch; each ``grad_accum_steps``-th also steps.

        Args:
            images: [B, 3, H, W] float32 in 0..1 (any device).
            targets: per image ``labels`` [N] int64 and ``boxes`` [N, 4] cxcywh in 0..1, ...
            index: position of the batch in the epoch (0-based).

        Returns:
            The loss terms and whether the optimizer stepped, or ``None`` when a non-finite loss (on any
            rank) skipped the step; the micro-batches accumulated with it are dropped too.
        """
        if index % self.grad_accum_steps == 0:
            self._window_losses.clear()  # a new accumulation window (each epoch starts one)
        last_micro_step = (index + 1) % self.grad_accum_steps == 0
        images = images.to(self.device, non_blocking=True)
        losses = self.backward(images, move_targets(targets, self.device), index, sync=last_micro_step)
        if losses is None:
            self._window_losses.clear()
            return None
        self._window_losses.append(sum(losses.values()))
        if last_micro_step:
            self.optimizer_step()
            self.state.step_losses.append(sum(self._window_losses) / len(self._window_losses))
            self._window_losses.clear()
        return StepResult(losses, optimizer_stepped=last_micro_step)

    def backward(
        self, images: Tensor, targets: list[dict[str, Any]], index: int, sync: bool = True
    ) -> dict[str, float] | None:
        """Forward, loss and backward of one micro-batch; gradients accumulate until :meth:`optimizer_step`.

        Args:
            images, targets: the batch, on :attr:`device`.
            index: position of the batch in the epoch, passed to the criterion as ``step``.
            sync: all-reduce the gradients (DDP); ``False`` for all but the last micro-batch of a window.

        Returns:
            The loss terms averaged over ranks, or ``None`` when the step was skipped for a non-finite loss.

        Raises:
            NonFiniteLossError: the ``MAX_NON_FINITE_STEPS``-th non-finite step in a row.
        """
        no_sync = getattr(self.train_model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        meta = {"epoch": self.state.epoch, "step": index, "global_step": self.state.global_step}
        with context:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                outputs = self.train_model(images, targets)
            losses = self.criterion(outputs, targets, **meta)  # fp32: the criterion upcasts
            loss = sum(losses.values())
            if self.graph_anchors:
                # A rank whose batch has no boxes builds no denoising queries, so `denoising_class_embed`
                # gets no gradient there; DDP without find_unused_parameters then waits on it forever (or
                # mismatches its collectives). This zero term keeps every trainable tensor in the graph.
                loss = loss + 0.0 * torch.stack([p.reshape(-1)[0] for p in self.graph_anchors]).sum()
            # one host sync per step: the sum is non-finite exactly when a term is (or overflows)
            non_finite = not bool(torch.isfinite(loss))
            bad = [k for k, v in losses.items() if not torch.isfinite(v)] if non_finite else []
            if self._any_rank(non_finite):
                self._skip_non_finite(bad, losses)
                return None
            self.non_finite_steps = 0
            self.scaler.scale(loss / self.grad_accum_steps).backward()
        return dist_utils.reduce_dict_for_logging({k: v.detach() for k, v in losses.items()})

    def optimizer_step(self) -> None:
        """Clip, step, EMA update and lr update after the gradients of one (accumulated) batch."""
        if self.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.lr_schedule.step()
        self.state.global_step += 1

    def _any_rank(self, flag: bool) -> bool:
        if dist_utils.get_world_size() == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        return bool(dist_utils.all_reduce_sum(value).item() > 0)

    def _skip_non_finite(self, bad: list[str], losses: Mapping[str, Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.non_finite_steps += 1
        epoch = self.state.epoch
        terms = ", ".join(f"{k}={losses[k].item()}" for k in bad) or "(on another rank)"
        logger.warning(
            "non-finite loss at epoch %d step %d, step skipped: %s", epoch, self.state.global_step, terms
        )
        if self.non_finite_steps >= MAX_NON_FINITE_STEPS:
            where = self.checkpoint_path or "the last checkpoint"
            raise NonFiniteLossError(
                f"{self.non_finite_steps} consecutive steps had non-finite losses ({terms}) "
                f"at epoch {epoch}; stopping. {where} holds the last good state. Try a lower lr, "
                "clip_max_norm, or use_amp=false, and check the data (dfine-train --check-data)."
            )
