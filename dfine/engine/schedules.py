"""Learning-rate schedules: per-step linear warm-up composed with a per-epoch step decay or a flat-then-cosine
decay, behind one object the trainer steps.

The config keeps the original D-FINE blocks:

.. code-block:: yaml

    lr_scheduler: {type: MultiStepLR, milestones: [500], gamma: 0.1}        # or
    lr_scheduler: {type: FlatCosineLR, flat_epochs: 40, min_lr_ratio: 0.05}
    lr_warmup_scheduler: {type: LinearWarmup, warmup_duration: 2000}

and DEIM's schedule, which brings its own (quadratic) warm-up, so it takes no ``lr_warmup_scheduler``:

.. code-block:: yaml

    lr_scheduler: {type: FlatCosineLRScheduler, lr_gamma: 0.5, warmup_iter: 2000, flat_epochs: 29,
                   no_aug_epochs: 8}
    lr_warmup_scheduler: null

Every group's lr is ``base_lr * warmup(step) * decay(step, epoch)``, a pure function of two counters: resuming
restores the counters and gives the same lr bit for bit, whatever happened in between.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dfine.config.build import build_block
from dfine.config.registry import LR_SCHEDULERS, LR_WARMUPS, ConfigError
from dfine.config.schema import block_spec

__all__ = [
    "FlatCosineLR",
    "FlatCosineLRScheduler",
    "LRSchedule",
    "LinearWarmup",
    "MultiStepLR",
    "build_lr_schedule",
    "lr_blocks",
]

# DEIM's top-level schedule keys (beside ``lrsheduler: flatcosine``, sic) -> FlatCosineLRScheduler arguments
DEIM_LR_KEYS = {"lr_gamma": "lr_gamma", "warmup_iter": "warmup_iter", "flat_epoch": "flat_epochs",
                "no_aug_epoch": "no_aug_epochs"}  # fmt: skip

logger = logging.getLogger(__name__)


@LR_WARMUPS.register()
class LinearWarmup:
    """Linear ramp over the first optimisation steps, as the original: step ``k`` (0-based) uses
    ``min(1, (k + 1) / warmup_duration)`` of the lr.

    Args:
        warmup_duration: optimisation steps of warm-up; 0 disables it.
    """

    def __init__(self, warmup_duration: int) -> None:
        if warmup_duration < 0:
            raise ConfigError(f"lr_warmup_scheduler.warmup_duration must be >= 0, got {warmup_duration}")
        self.warmup_duration = int(warmup_duration)

    def factor(self, step: int) -> float:
        if self.warmup_duration == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_duration)


@LR_SCHEDULERS.register()
class MultiStepLR:
    """Multiply the lr by ``gamma`` at each milestone epoch: epoch ``e`` (0-based) uses
    ``gamma ** (number of milestones <= e)``, as torch's ``MultiStepLR`` stepped once per epoch.

    Args:
        milestones: epochs at which the decay applies, increasing.
        gamma: multiplicative factor per milestone.
    """

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1) -> None:
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones):
            raise ConfigError(f"lr_scheduler.milestones must be increasing, got {milestones}")
        self.milestones = milestones
        self.gamma = float(gamma)

    def factor(self, step: int, epoch: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)

    def describe(self, steps_per_epoch: int) -> dict[str, Any]:
        return {
            "type": "MultiStepLR",
            "milestones": list(self.milestones),
            "milestone_steps": [m * steps_per_epoch for m in self.milestones],
            "gamma": self.gamma,
        }


@LR_SCHEDULERS.register()
class FlatCosineLR:
    """Keep the lr flat until ``flat_epochs``, then follow a per-step half cosine down to ``min_lr_ratio`` of
    each group's base lr at the last step of training.

    Args:
        flat_epochs: epochs at full lr (warm-up included) before the cosine starts.
        min_lr_ratio: final lr as a fraction of each group's base lr (a ratio keeps per-group lrs, e.g. the
            backbone's lower one, in proportion).
    """

    def __init__(self, flat_epochs: int, min_lr_ratio: float = 0.0) -> None:
        if flat_epochs < 0:
            raise ConfigError(f"lr_scheduler.flat_epochs must be >= 0, got {flat_epochs}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.flat_epochs = int(flat_epochs)
        self.min_lr_ratio = float(min_lr_ratio)
        self.total_steps = 0
        self.flat_steps = 0

    def bind(self, steps_per_epoch: int, epochs: int) -> None:
        self.total_steps = steps_per_epoch * epochs
        self.flat_steps = min(self.flat_epochs * steps_per_epoch, self.total_steps)

    def factor(self, step: int, epoch: int) -> float:
        if step < self.flat_steps:
            return 1.0
        decay_steps = max(1, self.total_steps - 1 - self.flat_steps)
        progress = min(1.0, (step - self.flat_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self, steps_per_epoch: int) -> dict[str, Any]:
        return {
            "type": "FlatCosineLR",
            "flat_epochs": self.flat_epochs,
            "cosine_start_step": self.flat_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }


@LR_SCHEDULERS.register()
class FlatCosineLRScheduler:
    """DEIM's schedule over global steps ``k``: quadratic warm-up, flat, half cosine, then flat at the floor.

    With ``W = warmup_iter``, and ``F = flat_epochs``, ``T = epochs``, ``A = no_aug_epochs`` in steps, the
    factor on each group's base lr is ``(k / W) ** 2`` for ``k <= W``, 1 up to ``F``, ``lr_gamma`` from
    ``T - A`` on, and between them ``lr_gamma + (1 - lr_gamma) * (1 + cos(pi * (k - F) / (T - F - A))) / 2``.

    Args:
        lr_gamma: final lr as a fraction of each group's base lr (DEIM: 0.5; 1.0 keeps it flat).
        warmup_iter: steps of quadratic warm-up (0: none).
        flat_epochs: epochs (warm-up included) at full lr; DEIM's ``flat_epoch``.
        no_aug_epochs: last epochs at the floor ``lr_gamma`` (DEIM's no-augmentation stage);
            DEIM's ``no_aug_epoch``.
    """

    includes_warmup = True

    def __init__(
        self, lr_gamma: float = 1.0, warmup_iter: int = 0, flat_epochs: int = 0, no_aug_epochs: int = 0
    ) -> None:
        for name, value in (("warmup_iter", warmup_iter), ("flat_epochs", flat_epochs),
                            ("no_aug_epochs", no_aug_epochs)):  # fmt: skip
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"lr_scheduler.{name} must be an int >= 0, got {value!r}")
        if not 0.0 <= lr_gamma <= 1.0:
            raise ConfigError(f"lr_scheduler.lr_gamma must be in [0, 1], got {lr_gamma}; DEIM uses 0.5")
        self.lr_gamma = float(lr_gamma)
        self.warmup_iter = warmup_iter
        self.flat_epochs = flat_epochs
        self.no_aug_epochs = no_aug_epochs
        self.total_steps = self.flat_steps = self.no_aug_steps = 0

    def bind(self, steps_per_epoch: int, epochs: int) -> None:
        self.total_steps = steps_per_epoch * epochs
        self.flat_steps = steps_per_epoch * self.flat_epochs
        self.no_aug_steps = steps_per_epoch * self.no_aug_epochs

    def factor(self, step: int, epoch: int) -> float:
        if step <= self.warmup_iter:
            return 1.0 if self.warmup_iter == 0 else (step / self.warmup_iter) ** 2
        if step <= self.flat_steps:
            return 1.0
        if step >= self.total_steps - self.no_aug_steps:
            return self.lr_gamma
        progress = (step - self.flat_steps) / (self.total_steps - self.flat_steps - self.no_aug_steps)
        return self.lr_gamma + (1.0 - self.lr_gamma) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self, steps_per_epoch: int) -> dict[str, Any]:
        return {
            "type": "FlatCosineLRScheduler",
            "warmup_iter": self.warmup_iter,
            "cosine_start_step": self.flat_steps,
            "floor_from_step": self.total_steps - self.no_aug_steps,
            "lr_gamma": self.lr_gamma,
        }


class LRSchedule:
    """The trainer's single lr object: set each group's lr from the step and epoch counters.

    Call :meth:`step` after every optimisation step and :meth:`epoch_step` after every epoch. The lr for the
    first step is set on construction.

    Args:
        optimizer: its groups' current ``lr`` values become the base lrs.
        steps_per_epoch: optimisation steps per epoch (after gradient accumulation).
        epochs: total epochs of the run.
        decay: :class:`MultiStepLR`, :class:`FlatCosineLR` or ``None`` (constant after warm-up).
        warmup: :class:`LinearWarmup` or ``None``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        epochs: int,
        decay: MultiStepLR | FlatCosineLR | FlatCosineLRScheduler | None = None,
        warmup: LinearWarmup | None = None,
    ) -> None:
        if steps_per_epoch <= 0 or epochs <= 0:
            raise ValueError(f"steps_per_epoch and epochs must be positive, got {steps_per_epoch}, {epochs}")
        self.optimizer = optimizer
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.decay = decay
        self.warmup = warmup
        if isinstance(decay, FlatCosineLR | FlatCosineLRScheduler):
            decay.bind(self.steps_per_epoch, self.epochs)
        self.base_lrs = [
            float(group.setdefault("initial_lr", group["lr"])) for group in optimizer.param_groups
        ]
        self.global_step = 0
        self.epoch = 0
        self.apply()

    def factor(self) -> float:
        """Multiplier on the base lrs at the current counters."""
        value = 1.0
        if self.warmup is not None:
            value *= self.warmup.factor(self.global_step)
        if self.decay is not None:
            value *= self.decay.factor(self.global_step, self.epoch)
        return value

    def apply(self) -> None:
        """Set every group's lr from the counters; call after ``optimizer.load_state_dict`` (which restores
        the lrs saved with it) when the schedule itself is not reloaded."""
        factor = self.factor()
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor

    def step(self) -> None:
        """Advance one optimisation step."""
        self.global_step += 1
        self.apply()

    def epoch_step(self) -> None:
        """Advance one epoch (call after the epoch's last optimisation step)."""
        self.epoch += 1
        self.apply()

    def get_last_lr(self) -> list[float]:
        """Current lr of every param group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "base_lrs": list(self.base_lrs),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters and base lrs, then set the groups' lrs from them."""
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(
                f"schedule state has {len(state['base_lrs'])} param groups, "
                f"the optimizer {len(self.base_lrs)}: "
                "the optimizer config changed since the checkpoint"
            )
        if int(state.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            logger.warning(
                "steps per epoch changed from %s to %d since the checkpoint: step-based schedule points move",
                state["steps_per_epoch"],
                self.steps_per_epoch,
            )
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base_lr
        self.apply()

    def describe(self) -> dict[str, Any]:
        """Resolved schedule for the start-up summary: total and warm-up steps, decay points, base lrs."""
        summary: dict[str, Any] = {
            "total_steps": self.steps_per_epoch * self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "warmup_steps": 0 if self.warmup is None else self.warmup.warmup_duration,
            "base_lrs": list(self.base_lrs),
        }
        if self.decay is not None:
            summary.update(self.decay.describe(self.steps_per_epoch))
        return summary


def _build(key: str, block: Mapping[str, Any]) -> Any:
    """Build the ``lr_scheduler`` / ``lr_warmup_scheduler`` block through its registry (``schema.BLOCKS``)."""
    try:
        return build_block(key, block, key)
    except ConfigError as error:
        name = block.get("type") if isinstance(block, Mapping) else None
        if isinstance(name, str) and name in block_spec(key).registry:
            raise ConfigError(f"{key}: bad arguments for {name}: {error}") from error
        raise  # no or an unknown type: the registry's message lists the registered names


def build_lr_schedule(
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Mapping[str, Any] | None,
    lr_warmup_scheduler: Mapping[str, Any] | None,
    steps_per_epoch: int,
    epochs: int,
) -> LRSchedule:
    """Build an :class:`LRSchedule` from the ``lr_scheduler`` and ``lr_warmup_scheduler`` config blocks.

    Args:
        optimizer: the optimiser (its current lrs are the base lrs).
        lr_scheduler: ``{type: MultiStepLR, milestones, gamma}``, ``{type: FlatCosineLR, flat_epochs,
            min_lr_ratio}`` (the ``LR_SCHEDULERS`` registry) or ``None``.
        lr_warmup_scheduler: ``{type: LinearWarmup, warmup_duration}`` (``LR_WARMUPS``) or ``None``.
        steps_per_epoch: optimisation steps per epoch.
        epochs: total epochs.

    Raises:
        ConfigError: an unknown type (listing the registered ones) or bad arguments for it.
    """
    decay = None if lr_scheduler is None else _build("lr_scheduler", lr_scheduler)
    warmup = None if lr_warmup_scheduler is None else _build("lr_warmup_scheduler", lr_warmup_scheduler)
    if warmup is not None and getattr(decay, "includes_warmup", False):
        raise ConfigError(
            f"lr_scheduler {type(decay).__name__} has its own warm-up (warmup_iter); set "
            "lr_warmup_scheduler: null (DEIM ignores it too) or use another lr_scheduler."
        )
    return LRSchedule(optimizer, steps_per_epoch, epochs, decay=decay, warmup=warmup)


def lr_blocks(cfg: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """The ``(lr_scheduler, lr_warmup_scheduler)`` blocks of a config, DEIM's top-level keys included.

    DEIM's configs write ``lrsheduler: flatcosine`` with ``lr_gamma``, ``warmup_iter``, ``flat_epoch`` and
    ``no_aug_epoch`` at the top level; they are accepted as the block ``{type: FlatCosineLRScheduler, ...}``.

    Raises:
        ConfigError: DEIM's keys together with an ``lr_scheduler`` / ``lr_warmup_scheduler`` block (two
            schedules; keep one), DEIM's keys without ``lrsheduler``, or another ``lrsheduler`` value.
    """
    given = [key for key in DEIM_LR_KEYS if cfg.get(key) is not None]
    name = cfg.get("lrsheduler")
    if name is None:
        if given:
            raise ConfigError(
                f"{', '.join(given)} set DEIM's lr schedule, which needs lrsheduler: flatcosine beside them "
                "(or use lr_scheduler: {type: FlatCosineLRScheduler, ...})."
            )
        return cfg.get("lr_scheduler"), cfg.get("lr_warmup_scheduler")
    if name != "flatcosine":
        raise ConfigError(f"lrsheduler: DEIM's only schedule is 'flatcosine', got {name!r}.")
    blocks = [key for key in ("lr_scheduler", "lr_warmup_scheduler") if cfg.get(key) is not None]
    if blocks:
        raise ConfigError(
            f"lrsheduler: flatcosine and {' and '.join(blocks)} both set a schedule; keep one (set "
            f"{': null, '.join(blocks)}: null to use DEIM's top-level keys)."
        )
    block = {"type": "FlatCosineLRScheduler"}
    block.update({DEIM_LR_KEYS[key]: cfg[key] for key in given})
    return block, None
