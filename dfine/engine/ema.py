"""Exponential moving average of a model's weights, with D-FINE's warm-up ramp on the decay.

The averaged copy is what D-FINE evaluates and publishes (``checkpoint["ema"]["module"]``), so its state dict
keeps the model's own key names. The config's ``ema`` block is built through the ``EMAS`` registry
(:func:`build_ema`): ``{type: ModelEMA, decay, warmups, start, restart_decay}``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from dfine.config.build import build_block
from dfine.config.registry import EMAS, ConfigError
from dfine.distributed import unwrap_model

__all__ = ["ModelEMA", "build_ema"]

logger = logging.getLogger(__name__)


@EMAS.register()
class ModelEMA:
    """Keep ``ema = d * ema + (1 - d) * model`` for every floating-point parameter and buffer.

    The decay ramps up as ``d(n) = decay * (1 - exp(-n / warmups))`` over the ``n``-th update, so the average
    follows the fast-changing weights of early training and settles to ``decay`` later. The first ``start``
    calls to :meth:`update` only copy the weights. Non-floating buffers (``num_batches_tracked``) are copied.

    Args:
        model: the model being trained (deep-copied; DDP / compile wrappers are unwrapped). Build the EMA
            after moving the model to its device.
        decay: final decay per update, in [0, 1).
        warmups: updates over which the decay ramps up (time constant); 0 disables the ramp.
        start: number of initial updates that copy the weights instead of averaging.
        restart_decay: final decay after :meth:`restart` without an argument (D-FINE's stage 2, its
            ``ema_restart_decay``); ``None`` keeps ``decay``.

    Raises:
        ConfigError: a decay outside [0, 1) or a negative count (config values, named by their ema key).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmups: int = 1000,
        start: int = 0,
        restart_decay: float | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1), got {decay}; D-FINE uses 0.9999")
        if restart_decay is not None and not 0.0 <= restart_decay < 1.0:
            raise ConfigError(f"ema.restart_decay must be in [0, 1), got {restart_decay}; D-FINE uses 0.9999")
        if warmups < 0 or start < 0:
            raise ConfigError(f"ema.warmups and ema.start must be >= 0, got warmups={warmups}, start={start}")
        self.module = deepcopy(unwrap_model(model)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = float(decay)
        self.warmups = int(warmups)
        self.start = int(start)
        self.restart_decay = None if restart_decay is None else float(restart_decay)
        self.updates = 0  # averaging updates since the last (re)start; drives the ramp
        self.before_start = 0  # updates spent copying, up to `start`

    def current_decay(self, updates: int | None = None) -> float:
        """Decay applied at update number ``updates`` (default: the most recent one)."""
        updates = self.updates if updates is None else updates
        if self.warmups == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average; call once per optimisation step."""
        source = unwrap_model(model).state_dict()
        averaged, current, copied_to, copied_from = [], [], [], []
        for key, ema_value in self.module.state_dict().items():
            if key not in source:
                raise KeyError(
                    f"EMA tensor '{key}' is missing from the model: was the model changed after EMA?"
                )
            if ema_value.dtype.is_floating_point:
                averaged.append(ema_value)
                current.append(source[key].detach().to(ema_value.dtype))
            else:
                copied_to.append(ema_value)
                copied_from.append(source[key])
        for target, value in zip(copied_to, copied_from, strict=True):
            target.copy_(value)
        if self.before_start < self.start:
            self.before_start += 1
            for target, value in zip(averaged, current, strict=True):
                target.copy_(value)
            return
        self.updates += 1
        decay = self.current_decay()
        if averaged:
            torch._foreach_mul_(averaged, decay)
            torch._foreach_add_(averaged, current, alpha=1.0 - decay)

    def restart(self, decay: float | None = None) -> None:
        """Restart the warm-up ramp (D-FINE stage 2), optionally with a new final decay.

        The next update uses ``d(1)``, close to 0, so the average quickly re-anchors on the current weights.

        Args:
            decay: the new final decay; ``None`` uses ``restart_decay`` (and keeps the decay when that is
                ``None`` too).
        """
        decay = self.restart_decay if decay is None else decay
        if decay is not None:
            if not 0.0 <= decay < 1.0:
                raise ValueError(f"ema restart decay must be in [0, 1), got {decay}")
            self.decay = float(decay)
        self.updates = 0
        logger.info("EMA restarted: decay %.6g, ramp over %d updates", self.decay, self.warmups)

    def to(self, *args: Any, **kwargs: Any) -> ModelEMA:
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state for a checkpoint.

        ``{"module": model state dict (original key names), "updates", "decay", "warmups", "start",
        "before_start"}``; ``module`` / ``updates`` as in the original D-FINE's ``checkpoint["ema"]``.
        """
        return {
            "module": self.module.state_dict(),
            "updates": self.updates,
            "decay": self.decay,
            "warmups": self.warmups,
            "start": self.start,
            "before_start": self.before_start,
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load :meth:`state_dict` output, or an original D-FINE ``checkpoint["ema"]`` (module, updates).

        Keys absent from ``state`` (e.g. ``decay`` in original checkpoints) keep their configured values.
        """
        if "module" not in state:
            raise KeyError(f"EMA state needs a 'module' entry, got keys {sorted(state)}")
        self.module.load_state_dict(state["module"], strict=strict)
        self.updates = int(state.get("updates", self.updates))
        self.decay = float(state.get("decay", self.decay))
        self.warmups = int(state.get("warmups", self.warmups))
        self.start = int(state.get("start", self.start))
        # An original checkpoint has no copy counter; if it has averaged at all, copying is over.
        default_before_start = self.start if self.updates > 0 else self.before_start
        self.before_start = int(state.get("before_start", default_before_start))

    def __repr__(self) -> str:
        settings = (
            f"decay={self.decay}, warmups={self.warmups}, start={self.start}, "
            f"restart_decay={self.restart_decay}, updates={self.updates}"
        )
        return f"ModelEMA({settings})"


def build_ema(block: Mapping[str, Any] | None, model: nn.Module, where: str = "ema") -> ModelEMA:
    """Build the config's ``ema`` block (``{type: ModelEMA, decay, warmups, start, restart_decay}``).

    Args:
        block: the ``ema`` block; ``None`` or empty gives ``ModelEMA`` with its defaults.
        model: the model to average (after it is on its device); handed over by the builder, never set in the
            block.
        where: ``file: ema`` for messages.

    Raises:
        ConfigError: an unknown type (listing the registered ones) or argument, or a bad value.
    """
    return build_block("ema", block or {"type": "ModelEMA"}, where, model=model)
