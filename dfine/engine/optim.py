"""Optimiser with regex parameter groups (the original D-FINE config shape) and the batch-size scaling rule.

.. code-block:: yaml

    optimizer:
      type: AdamW
      params:
        - {params: '^(?=.*backbone)(?!.*norm|bn).*$', lr: 0.0000125}          # backbone: lower lr
        - {params: '^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$', weight_decay: 0.}
      lr: 0.00025
      betas: [0.9, 0.999]
      weight_decay: 0.000125

A group's ``params`` regex selects every trainable parameter whose name it matches anywhere (``re.search``, as
the original's ``re.findall``); the other group keys override the top-level defaults for that group. Trainable
parameters no regex selects form a last, default group. Frozen parameters (``requires_grad=False``) are left
out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfine.config.build import build_block
from dfine.config.loading import plain
from dfine.config.registry import OPTIMIZERS, ConfigError, constructor_arguments, did_you_mean
from dfine.config.schema import block_spec
from dfine.distributed import unwrap_model

__all__ = [
    "OPTIMIZERS",
    "ParamGroup",
    "build_optimizer",
    "group_summary",
    "param_groups_from_config",
    "scale_for_batch_size",
]

logger = logging.getLogger(__name__)

# torch's own classes: an optimizer block is exactly their keyword arguments (its `params` being the groups).
OPTIMIZERS.register()(torch.optim.AdamW)
OPTIMIZERS.register()(torch.optim.Adam)
OPTIMIZERS.register()(torch.optim.SGD)


@dataclass
class ParamGroup:
    """One optimiser parameter group and where it came from.

    Attributes:
        pattern: the regex from the config, or ``None`` for the default group.
        names: parameter names (without DDP's ``module.`` prefix) in the group, in model order.
        parameters: the parameters, aligned with ``names``.
        options: the group's own settings (``lr``, ``weight_decay``, ...), overriding the optimiser defaults.
    """

    pattern: str | None
    names: list[str] = field(default_factory=list)
    parameters: list[nn.Parameter] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_elements(self) -> int:
        return sum(p.numel() for p in self.parameters)


def _split_block(block: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], dict[str, Any]]:
    """Check an ``optimizer`` block; return its param-group blocks and the optimiser's default settings.

    The type and the top-level settings are checked by the registry, as for every block; the groups are not
    constructor arguments of their own (each becomes one torch param group), so their keys are checked here
    against the same constructor's arguments.
    """
    OPTIMIZERS.check_block(block, "optimizer", nested=block_spec("optimizer").nested)
    groups = block.get("params") or []
    if not isinstance(groups, list):
        raise ConfigError(f"optimizer.params must be a list of {{params: REGEX, ...}} blocks, got {groups!r}")
    name = block["type"]
    allowed = set(constructor_arguments(OPTIMIZERS.get(name))) - {"params"}
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise ConfigError(
                f"optimizer.params[{index}] must be a mapping with a 'params' regex, got {group!r}"
            )
        for key in group:
            if key != "params" and key not in allowed:
                raise ConfigError(
                    f"optimizer.params[{index}].{key} is not a setting of {name}.{did_you_mean(key, allowed)}"
                )
    # YAML gives lists where torch documents tuples (betas).
    defaults = {k: tuple(v) if isinstance(v, list) else v for k, v in block.items() if k != "params"}
    return groups, defaults


def param_groups_from_config(model: nn.Module, block: Mapping[str, Any]) -> list[ParamGroup]:
    """Assign the model's trainable parameters to the config's regex groups.

    Args:
        model: the model (DDP / compile wrappers are unwrapped, so regexes see the original names).
        block: the ``optimizer`` config block (see the module docstring).

    Returns:
        One :class:`ParamGroup` per config group, in config order (empty ones kept, so group indices match the
        config and the optimiser state of checkpoints), then a default group if any parameter is left over.

    Raises:
        ConfigError: a regex does not compile, or a parameter is matched by two groups.
    """
    group_blocks, _ = _split_block(block)
    named = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
    groups: list[ParamGroup] = []
    owner: dict[str, int] = {}
    for index, group_block in enumerate(group_blocks):
        pattern = group_block["params"]
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ConfigError(f"optimizer.params[{index}].params: bad regex {pattern!r}: {error}") from error
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in group_block.items() if k != "params"}
        group = ParamGroup(pattern=pattern, options=options)
        for name, parameter in named:
            if not regex.search(name):
                continue
            if name in owner:
                raise ConfigError(
                    f"optimizer.params: parameter '{name}' is matched by two groups, "
                    f"[{owner[name]}] {group_blocks[owner[name]]['params']!r} and [{index}] {pattern!r}; "
                    "make the regexes exclusive (e.g. add a (?!...) lookahead)."
                )
            owner[name] = index
            group.names.append(name)
            group.parameters.append(parameter)
        if not group.names:
            logger.warning("optimizer.params[%d] %r matches no trainable parameter", index, pattern)
        groups.append(group)
    leftover = ParamGroup(pattern=None)
    for name, parameter in named:
        if name not in owner:
            leftover.names.append(name)
            leftover.parameters.append(parameter)
    if leftover.names:
        groups.append(leftover)
    return groups


def build_optimizer(
    model: nn.Module, block: Mapping[str, Any], groups: Sequence[ParamGroup] | None = None
) -> torch.optim.Optimizer:
    """Build the optimiser of an ``optimizer`` config block (``type``: AdamW, Adam or SGD, in ``OPTIMIZERS``).

    Args:
        model: the model to optimise.
        block: the ``optimizer`` config block.
        groups: groups already computed by :func:`param_groups_from_config` (to log them once); computed here
            when ``None``.

    Returns:
        A ``torch.optim`` optimiser whose param groups follow ``groups``' order.
    """
    _, defaults = _split_block(block)
    if groups is None:
        groups = param_groups_from_config(model, block)
    if not any(group.parameters for group in groups):
        raise ConfigError("optimizer: the model has no trainable parameters (is everything frozen?)")
    torch_groups = [{"params": list(group.parameters), **group.options} for group in groups]
    return build_block("optimizer", defaults, "optimizer", params=torch_groups)


def group_summary(groups: Sequence[ParamGroup], optimizer: torch.optim.Optimizer | None = None) -> str:
    """A few lines for the start-up log: per group its regex, size and effective settings.

    Args:
        groups: from :func:`param_groups_from_config`.
        optimizer: when given, the effective ``lr`` / ``weight_decay`` are read from its param groups.
    """
    lines = []
    for index, group in enumerate(groups):
        settings = dict(group.options)
        if optimizer is not None and index < len(optimizer.param_groups):
            torch_group = optimizer.param_groups[index]
            settings = {k: torch_group[k] for k in ("lr", "weight_decay") if k in torch_group} | settings
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
        pattern = "<default>" if group.pattern is None else repr(group.pattern)
        lines.append(
            f"group {index} {pattern}: {len(group.names)} tensors, {group.num_elements:,} values; {shown}"
        )
    return "\n".join(lines)


# Config paths the batch-size rule touches. Step counts shrink with a larger batch so that they cover the same
# number of images; EMA decays follow the original README: 1 - (1 - decay) * k.
_STEP_COUNT_PATHS = (("ema", "warmups"), ("ema", "start"), ("lr_warmup_scheduler", "warmup_duration"))
_DECAY_PATHS = (
    ("ema", "decay"),
    ("ema", "restart_decay"),
    ("train_dataloader", "collate_fn", "ema_restart_decay"),  # the original configs' place for it
)


def _get_path(config: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _set_path(config: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def scale_for_batch_size(
    config: Mapping[str, Any], total_batch_size: int, reference_batch_size: int
) -> tuple[dict[str, Any], list[str]]:
    """Apply the rule the original README asks users to apply by hand when the batch size changes.

    With ``k = total_batch_size / reference_batch_size``: ``optimizer.lr`` and every
    ``optimizer.params[i].lr`` are multiplied by ``k`` (linear scaling); ``ema.warmups``, ``ema.start`` and
    ``lr_warmup_scheduler.warmup_duration`` are divided by ``k`` (rounded, at least 1 when they were
    positive), so they span the same number of images; EMA decays (``ema.decay``, ``ema.restart_decay`` and
    the original's ``train_dataloader.collate_fn.ema_restart_decay``) become ``1 - (1 - decay) * k``, so the
    average has the same horizon in images. Missing keys are left alone.

    Args:
        config: the resolved config as nested mappings (not modified).
        total_batch_size: images per optimisation step over all ranks and gradient-accumulation steps.
        reference_batch_size: the batch size the config's values were tuned for.

    Returns:
        ``(scaled_config, changes)``: a deep copy with the scaled values, and one human-readable line per
        change (``"optimizer.lr: 0.00025 -> 0.000125"``); no changes when the two batch sizes are equal.
    """
    if total_batch_size <= 0 or reference_batch_size <= 0:
        raise ConfigError(
            f"batch sizes must be positive, got total_batch_size={total_batch_size}, "
            f"reference_batch_size={reference_batch_size}"
        )
    scaled = plain(config)
    if total_batch_size == reference_batch_size:
        return scaled, []
    factor = total_batch_size / reference_batch_size
    changes: list[str] = []

    def record(path: Sequence[Any], old: Any, new: Any) -> None:
        label = ".".join(str(p) for p in path).replace(".[", "[")
        changes.append(
            f"{label}: {old:g} -> {new:g} (batch {total_batch_size} vs reference {reference_batch_size})"
        )

    optimizer = scaled.get("optimizer")
    if isinstance(optimizer, dict):
        if isinstance(optimizer.get("lr"), int | float):
            new = optimizer["lr"] * factor
            record(("optimizer", "lr"), optimizer["lr"], new)
            optimizer["lr"] = new
        for index, group in enumerate(optimizer.get("params") or []):
            if isinstance(group, dict) and isinstance(group.get("lr"), int | float):
                new = group["lr"] * factor
                record(("optimizer", "params", f"[{index}]", "lr"), group["lr"], new)
                group["lr"] = new
    for path in _STEP_COUNT_PATHS:
        old = _get_path(scaled, path)
        if isinstance(old, int | float) and old > 0:
            new = max(1, round(old / factor))
            if new != old:
                record(path, old, new)
                _set_path(scaled, path, new)
    for path in _DECAY_PATHS:
        old = _get_path(scaled, path)
        if isinstance(old, int | float):
            new = 1.0 - (1.0 - old) * factor
            if not 0.0 <= new < 1.0:
                raise ConfigError(
                    f"{'.'.join(path)}: decay {old} scaled by batch factor {factor:g} gives {new:g}, "
                    "outside [0, 1); "
                    "set reference_batch_size closer to the batch size or set the decay by hand"
                )
            record(path, old, new)
            _set_path(scaled, path, new)
    return scaled, changes
