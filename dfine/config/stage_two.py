"""D-FINE's stage 2, resolved from every place the original configs write it.

Stage 2 is the last part of training: strong augmentation and multi-scale switch off, the best stage-1 weights
are reloaded and the EMA restarts. The original configs write its epoch twice,
``train_dataloader.collate_fn.stop_epoch`` (multi-scale off) and
``train_dataloader.dataset.transforms.policy.epoch`` (augmentation off; with DEIM's three-epoch policy
``[start, mosaic_stop, stop]`` its last entry); both are accepted and must agree when both are set. DEIM
keeps D-FINE's stage-2 mechanics unchanged (best stage-1 reload, EMA restart, multi-scale stop, all at
``stop_epoch``), so both recipes share this one resolver. The EMA decay after the restart belongs in the ema
block (``ema.restart_decay``, a ``ModelEMA`` argument); the original's
``train_dataloader.collate_fn.ema_restart_decay`` is still read.

:func:`resolve_stage_two` is the one reader of these keys; :func:`dfine.config.validate_config` runs its
checks (:func:`check_stage_two`), so a config whose places disagree fails when it is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dfine.config.registry import ConfigError

__all__ = [
    "EPOCH_KEYS",
    "OLD_RESTART_DECAY_KEY",
    "RESTART_DECAY_KEY",
    "StageTwo",
    "check_stage_two",
    "resolve_stage_two",
]

logger = logging.getLogger(__name__)

# Every place the original D-FINE configs write the stage-2 epoch.
EPOCH_KEYS = ("train_dataloader.collate_fn.stop_epoch", "train_dataloader.dataset.transforms.policy.epoch")
RESTART_DECAY_KEY = "ema.restart_decay"
OLD_RESTART_DECAY_KEY = "train_dataloader.collate_fn.ema_restart_decay"
_MILESTONES_KEY = "lr_scheduler.milestones"


@dataclass(frozen=True)
class StageTwo:
    """When stage 2 starts and how the EMA restarts there.

    Attributes:
        epoch: first epoch (0-based) of stage 2; ``None``: the run stays in stage 1.
        ema_restart_decay: final EMA decay after the stage-2 restart; ``None``: keep ``ema.decay``.
    """

    epoch: int | None
    ema_restart_decay: float | None


def _get(cfg: Mapping[str, Any], path: str) -> Any:
    node: Any = cfg
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _where(cfg: Mapping[str, Any], path: str) -> str:
    where = getattr(cfg, "where", None)  # a loaded Config knows the file that set each key
    return where(path) if callable(where) else path


def _epoch(cfg: Mapping[str, Any]) -> int | None:
    found = {path: _get(cfg, path) for path in EPOCH_KEYS}
    found = {path: value for path, value in found.items() if value is not None}
    policy = EPOCH_KEYS[1]
    if isinstance(found.get(policy), list) and found[policy]:
        found[policy] = found[policy][-1]  # DEIM's stages: the last one is the no-aug stage 2
    for path, value in found.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(
                f"{_where(cfg, path)} must be an epoch number >= 0, got {value!r}; e.g. -u {path}=72"
            )
    if len(set(found.values())) > 1:
        places = ", ".join(f"{_where(cfg, path)} = {value}" for path, value in found.items())
        # Only the two switches must agree. The lr drop is a separate choice: the original configs use
        # milestones: [500] (never reached) with stop_epoch: 72, and dropping the lr at another epoch than
        # the augmentation switch is a legitimate recipe, so milestones are shown for context, not checked.
        milestones = _get(cfg, _MILESTONES_KEY)
        context = (
            f" ({_where(cfg, _MILESTONES_KEY)} = {milestones} is independent of stage 2.)"
            if milestones is not None
            else ""
        )
        raise ConfigError(
            f"the stage-2 epoch is set in places that disagree: {places}. They switch multi-scale and "
            f"the strong augmentation off together; set them to the same epoch.{context}"
        )
    return next(iter(found.values()), None)


def _ema_restart_decay(cfg: Mapping[str, Any]) -> float | None:
    found = {path: _get(cfg, path) for path in (RESTART_DECAY_KEY, OLD_RESTART_DECAY_KEY)}
    found = {path: value for path, value in found.items() if value is not None}
    for path, value in found.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            raise ConfigError(
                f"{_where(cfg, path)} must be a decay in [0, 1), got {value!r}; "
                f"e.g. -u {RESTART_DECAY_KEY}=0.9999"
            )
    if len(set(found.values())) > 1:
        raise ConfigError(
            f"the EMA decay after the stage-2 restart is set twice with different values: "
            f"{_where(cfg, RESTART_DECAY_KEY)} = {found[RESTART_DECAY_KEY]} and "
            f"{_where(cfg, OLD_RESTART_DECAY_KEY)} = {found[OLD_RESTART_DECAY_KEY]}; "
            f"keep {RESTART_DECAY_KEY} and remove the other."
        )
    value = next(iter(found.values()), None)
    return None if value is None else float(value)


def check_stage_two(cfg: Mapping[str, Any]) -> None:
    """Raise what :func:`resolve_stage_two` would raise, and say nothing else (config validation).

    Raises:
        ConfigError: as :func:`resolve_stage_two`.
    """
    _epoch(cfg)
    _ema_restart_decay(cfg)


def resolve_stage_two(cfg: Mapping[str, Any]) -> StageTwo:
    """Read the stage-2 epoch and EMA restart decay from wherever the config sets them.

    Args:
        cfg: the resolved config (a :class:`dfine.config.Config` names files in errors; a plain mapping, e.g.
            a checkpoint's config, works too).

    Returns:
        The :class:`StageTwo` settings; a field is ``None`` when no place sets it.

    Raises:
        ConfigError: the places of one setting disagree (every key is named with its value and file), or a
            value has the wrong type or range.
    """
    stage_two = StageTwo(epoch=_epoch(cfg), ema_restart_decay=_ema_restart_decay(cfg))
    if _get(cfg, RESTART_DECAY_KEY) is None and _get(cfg, OLD_RESTART_DECAY_KEY) is not None:
        # said where the value is used (once per run), not at every load of the config
        logger.info(
            "%s: the EMA restart decay now belongs in %s (a ModelEMA argument); using %g from here",
            _where(cfg, OLD_RESTART_DECAY_KEY),
            RESTART_DECAY_KEY,
            stage_two.ema_restart_decay,
        )
    return stage_two
