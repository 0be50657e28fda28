"""Where a training run stands, and the checkpoint files that keep it: save, resume, the Ctrl-C save.

A checkpoint holds the weights and optimiser state of the :class:`~dfine.engine.step.TrainStep` (``model``,
``ema``, ``optimizer``, ``lr_schedule``, ``scaler``), the :class:`RunState` counters (``epoch``,
``last_epoch``, ``global_step``, ``stage``, ``best``, ``seed``, ``history``), the RNG states (``rng``), the
training set's classes (``label_map``) and the resolved ``config``; a Ctrl-C save adds ``interrupted``.
``model`` and ``ema.module`` use the original D-FINE key names.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dfine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_weights_strict,
    restore_rng_state,
    save_atomic,
)
from dfine.config import Config
from dfine.config.registry import ConfigError

if TYPE_CHECKING:
    from dfine.engine.step import TrainStep

__all__ = ["RunCheckpoints", "RunState", "existing_checkpoints", "resume_or_refuse", "seed_everything"]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def existing_checkpoints(output_dir: Path) -> list[Path]:
    """The run checkpoints in ``output_dir`` (last, best, best_stage1, checkpointNNNN), newest first."""
    if not output_dir.is_dir():
        return []
    named = [output_dir / name for name in ("last.pth", "best.pth", "best_stage1.pth")]
    found = [path for path in [*named, *output_dir.glob("checkpoint[0-9]*.pth")] if path.is_file()]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def resume_or_refuse(output_dir: Path, resume: str | None, exist_ok: bool = False) -> str | None:
    """Decide how a run starts in ``output_dir`` so that it never writes over another run's checkpoints.

    Args:
        output_dir: the run folder.
        resume: what the user asked for with ``-r`` (``None``: a fresh run).
        exist_ok: ``--exist-ok``: a fresh run may start over on top of the checkpoints there.

    Returns:
        What to resume from: ``resume`` itself; ``"auto"`` when torchrun restarted the worker group
        (``TORCHELASTIC_RESTART_COUNT > 0``), so the new attempt continues the one that died instead of
        starting over; ``None`` for a fresh run.

    Raises:
        ConfigError: a fresh run (no ``-r``, no ``--exist-ok``) whose folder already holds checkpoints; the
            message names the folder and the three choices. Nothing has been written at that point.
    """
    if resume:
        return resume
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts > 0:
        logger.warning(
            "torchrun restarted the workers (attempt %d): continuing from %s/last.pth when present (-r auto)",
            restarts + 1,
            output_dir,
        )
        return "auto"
    found = existing_checkpoints(output_dir)
    if not found:
        return None
    names = ", ".join(path.name for path in found[:5])
    if exist_ok:
        logger.warning("--exist-ok: starting over in %s; checkpoints (%s) are replaced", output_dir, names)
        return None
    raise ConfigError(
        f"{output_dir} already holds a run ({names}); nothing was changed. Continue it with -r auto, "
        "start a new run elsewhere with --output-dir NEW_FOLDER, or start over in it with --exist-ok "
        "(its checkpoints will be overwritten)"
    )


@dataclass
class RunState:
    """The counters of a run: what a checkpoint keeps besides weights and optimiser state.

    Attributes:
        seed: the run's seed (the same on every rank).
        epoch: the next epoch to train (0-based); equals the number of finished epochs.
        global_step: optimizer steps taken since the run began.
        stage: 1, or 2 once D-FINE's second phase (from ``stop_epoch``) has begun.
        best_ap: best validation AP so far (-1 before the first evaluation), ``best_epoch`` its epoch.
        best_stage1_ap: best AP during stage 1: ``best_stage1.pth``, which stage 2 starts from.
        history: one record per finished epoch (losses, lr, ``val_*`` metrics, time), as in metrics.jsonl.
        step_losses: total loss of each optimizer step run in this process (mean over micro-batches and
            ranks); kept in memory only.
        epoch_start_schedule: the lr schedule's state when the running epoch began, and
            ``epoch_start_step`` the global step then: a Ctrl-C save rewinds to them.
    """

    seed: int
    epoch: int = 0
    global_step: int = 0
    stage: int = 1
    best_ap: float = -1.0
    best_epoch: int = -1
    best_stage1_ap: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    epoch_start_schedule: dict[str, Any] | None = None
    epoch_start_step: int = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters' checkpoint entries: epoch, last_epoch, global_step, stage, best, seed, history."""
        return {
            "epoch": self.epoch,
            "last_epoch": self.epoch - 1,
            "global_step": self.global_step,
            "stage": self.stage,
            "best": {"ap": self.best_ap, "epoch": self.best_epoch, "stage1_ap": self.best_stage1_ap},
            "seed": self.seed,
            "history": self.history,
        }

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Take the counters from a checkpoint (missing ``stage``, ``best``, ``seed`` keep their defaults)."""
        self.epoch = int(checkpoint["epoch"])
        self.global_step = int(checkpoint["global_step"])
        self.stage = int(checkpoint.get("stage", 1))
        best = checkpoint.get("best") or {}
        self.best_ap = float(best.get("ap", -1.0))
        self.best_epoch = int(best.get("epoch", -1))
        self.best_stage1_ap = float(best.get("stage1_ap", -1.0))
        self.seed = int(checkpoint.get("seed", self.seed))
        self.history = list(checkpoint.get("history") or [])


def _standard_layout(weights: dict[str, Any]) -> dict[str, Any]:
    """``weights`` with channels-last tensors copied to the standard layout, so the model and EMA weights in
    the file are the same whatever memory format training used, and tools that need contiguous tensors
    (safetensors, the HF converter) take them as they are. The optimizer's moments keep the training layout:
    only a resume reads them, and AdamW steps with moments in either layout."""
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}


class RunCheckpoints:
    """The run's checkpoint files: what goes into them, writing them (rank 0 only) and resuming from them.

    Args:
        state: the run's counters.
        step: the training step; its model, EMA, optimizer, lr schedule and grad scaler are saved.
        config: the resolved config, saved as a plain dict.
        label_map: the training set's label map (``to_entries()``), or ``None``.
        output_dir: the run folder the files go to.
        enabled: ``False`` on ranks other than 0 (they write nothing).
    """

    def __init__(
        self,
        state: RunState,
        step: TrainStep,
        config: Config,
        label_map: Any,
        output_dir: Path,
        enabled: bool = True,
    ) -> None:
        self.state = state
        self.step = step
        self.config = config
        self.label_map = label_map
        self.output_dir = Path(output_dir)
        self.enabled = enabled

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (the layout in the module docstring)."""
        step = self.step
        ema = step.ema.state_dict() if step.ema is not None else None
        if ema is not None:
            ema["module"] = _standard_layout(ema["module"])
        return {
            "model": _standard_layout(step.model.state_dict()),
            "ema": ema,
            "optimizer": step.optimizer.state_dict(),
            "lr_schedule": step.lr_schedule.state_dict(),
            "scaler": step.scaler.state_dict(),
            **self.state.state_dict(),  # epoch, last_epoch, global_step, stage, best, seed, history
            "rng": capture_rng_state(),
            "label_map": self.label_map.to_entries() if self.label_map is not None else None,
            "config": self.config.to_dict(),
        }

    def save(self, name: str) -> None:
        """Write :meth:`state_dict` to ``output_dir/name`` atomically (rank 0; other ranks return)."""
        if self.enabled:
            save_atomic(self.state_dict(), self.output_dir / name)

    def save_epoch(self, epoch: int, checkpoint_freq: int) -> None:
        """``last.pth`` after every epoch, plus ``checkpointNNNN.pth`` every ``checkpoint_freq`` epochs."""
        self.save("last.pth")
        if checkpoint_freq and (epoch + 1) % checkpoint_freq == 0:
            self.save(f"checkpoint{epoch:04}.pth")

    def save_interrupted(self) -> None:
        """Ctrl-C: keep the weights trained so far in ``last.pth``, the schedule rewound to the epoch's start.

        The interrupted epoch counts as not done, so ``-r auto`` runs it again from its first batch, starting
        from these weights, with the lr it would have had; nothing finished is lost.
        """
        state = self.state
        if not self.enabled or state.epoch_start_schedule is None:
            return
        checkpoint = self.state_dict()
        interrupted_at = state.global_step
        checkpoint["lr_schedule"] = state.epoch_start_schedule
        checkpoint["global_step"] = state.epoch_start_step
        checkpoint["interrupted"] = {"epoch": state.epoch, "global_step": interrupted_at}
        path = self.output_dir / "last.pth"
        save_atomic(checkpoint, path)
        logger.warning(
            "interrupted in epoch %d (step %d): saved %s; continue with -r auto (or -r %s), which redoes "
            "epoch %d from these weights",
            state.epoch,
            interrupted_at,
            path,
            path,
            state.epoch,
        )

    def resume(self, resume: str) -> None:
        """Load weights, optimiser state, schedule, scaler, counters and RNG from a checkpoint.

        Args:
            resume: a checkpoint path, or ``"auto"`` for ``output_dir/last.pth`` (a fresh run when the folder
                holds no checkpoint). When that file is unreadable (a damaged disk), ``"auto"`` falls back to
                the newest checkpoint there that loads, with a warning naming both files.

        Raises:
            ConfigError: the file holds weights only (it names ``-t`` as the way to start from it).
            CheckpointError: the file is unreadable or its weights do not fit the model.
        """
        step = self.step
        if resume == "auto":
            found = self._newest_loadable()
            if found is None:
                logger.info("-r auto: no checkpoint in %s yet, starting a fresh run", self.output_dir)
                return
            path, checkpoint = found
        else:
            path = Path(resume)
            checkpoint = load_checkpoint(path, map_location=step.device)
        if "optimizer" not in checkpoint or "epoch" not in checkpoint:
            raise ConfigError(
                f"{path} holds weights only (no optimizer/epoch state), so it cannot be resumed: "
                f"use -t {path} to fine-tune from it instead"
            )
        load_weights_strict(step.model, checkpoint["model"])
        if step.ema is not None and checkpoint.get("ema"):
            step.ema.load_state_dict(checkpoint["ema"])
        step.optimizer.load_state_dict(checkpoint["optimizer"])
        step.lr_schedule.load_state_dict(checkpoint["lr_schedule"])
        step.scaler.load_state_dict(checkpoint["scaler"])
        self.state.load_state_dict(checkpoint)
        if checkpoint.get("rng"):
            restore_rng_state(checkpoint["rng"])
        logger.info(
            "resumed %s: next epoch %d, step %d, stage %d",
            path,
            self.state.epoch,
            self.state.global_step,
            self.state.stage,
        )

    def _newest_loadable(self) -> tuple[Path, dict[str, Any]] | None:
        """``last.pth``, else the newest full checkpoint in ``output_dir`` that loads; None if none.

        Raises:
            CheckpointError: checkpoints exist but none of them loads (each is named with its error).
        """
        candidates = existing_checkpoints(self.output_dir)
        last = self.output_dir / "last.pth"
        if last in candidates:  # the newest by design; put first whatever the clock says
            candidates.remove(last)
            candidates.insert(0, last)
        failures: list[str] = []
        for path in candidates:
            try:
                checkpoint = load_checkpoint(path, map_location=self.step.device)
            except CheckpointError as error:
                failures.append(f"{path.name}: {error}")
                continue
            if "optimizer" not in checkpoint or "epoch" not in checkpoint:
                continue  # weights only: cannot continue a run
            if failures:
                logger.warning(
                    "-r auto: %s is unreadable, resuming from %s (the newest checkpoint that loads); the "
                    "epochs after it are trained again. Unreadable: %s",
                    candidates[0],
                    path,
                    "; ".join(failures),
                )
            return path, checkpoint
        if failures:
            raise CheckpointError(
                f"-r auto: no checkpoint in {self.output_dir} loads: "
                + "; ".join(failures)
                + ". Start over with --exist-ok or point -r at a good copy"
            )
        return None
