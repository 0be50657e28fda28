"""``Compose``: the transform pipeline of a dataset block, with D-FINE's stop-epoch policy.

The block loads unchanged from the original configs::

    transforms:
      type: Compose
      ops:
        - {type: RandomPhotometricDistort, p: 0.5}
        - ...
      policy: {name: stop_epoch, epoch: 72, ops: [RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop]}

From epoch ``policy.epoch`` on, the ops named in ``policy.ops`` are skipped (matched by their config
``type``), which is how D-FINE's second training stage sees clean, lightly augmented images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dfine.config.registry import TRANSFORMS, ConfigError, did_you_mean

__all__ = ["Compose", "build_transforms"]

logger = logging.getLogger(__name__)

_warned: set[tuple[str, str]] = set()  # one warning per pipeline and op, however often it is built
_POLICY_KEYS = {"default": {"name"}, "stop_epoch": {"name", "epoch", "ops"}}


@TRANSFORMS.register()
class Compose:
    """Apply ``ops`` in order to ``(image, target)``, skipping the policy's ops from its epoch on.

    Args:
        ops: transform blocks ``{type: Name, **args}`` (built through the ``TRANSFORMS`` registry) or already
            built transforms; None or empty: the identity.
        policy: None / ``{name: default}`` (all ops always), or
            ``{name: stop_epoch, epoch: E, ops: [names]}``.
    """

    def __init__(
        self,
        ops: Sequence[Mapping[str, Any] | Callable[..., Any]] | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> None:
        self.ops = _build_ops(ops, "transforms")
        # Registered names are the class names, so the policy can match built ops by their type's name.
        self.op_names = [type(op).__name__ for op in self.ops]
        self.policy = _check_policy(dict(policy or {"name": "default"}), self.op_names, "transforms")
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Epoch used when the caller passes none (the dataset passes its own, shared with loader workers)."""
        self.epoch = epoch

    def active(self, epoch: int) -> list[bool]:
        """Which ops run at ``epoch``."""
        if self.policy["name"] != "stop_epoch" or epoch < self.policy["epoch"]:
            return [True] * len(self.ops)
        stopped = set(self.policy["ops"])
        return [name not in stopped for name in self.op_names]

    def __call__(
        self,
        image: Any,
        target: dict[str, Any] | None = None,
        *,
        dataset: Any = None,
        epoch: int | None = None,
    ) -> Any:
        """Transform one sample.

        Args:
            image: PIL image or image tensor.
            target: dict with ``boxes`` (``tv_tensors.BoundingBoxes``) and ``labels``; None for an image alone
                (prediction), then only the image is returned.
            dataset: handed to ops that draw other samples (`Mosaic`).
            epoch: training epoch for the policy (default: the one given to `set_epoch`).

        Returns:
            ``(image, target)``, or the image when ``target`` is None.
        """
        epoch = self.epoch if epoch is None else epoch
        for op, active in zip(self.ops, self.active(epoch), strict=True):
            if not active:
                continue
            if target is None:
                image = op(image)
            elif getattr(op, "needs_dataset", False):
                image, target = op(image, target, dataset)
            else:
                image, target = op(image, target)
        return image if target is None else (image, target)

    def __repr__(self) -> str:
        lines = [f"  {op!r}" for op in self.ops]
        return "Compose(\n" + "\n".join(lines) + f"\n  policy={self.policy}\n)"


def build_transforms(block: Mapping[str, Any] | None, where: str = "transforms") -> Compose:
    """Build a dataset's ``transforms`` block (``{type: Compose, ops, policy}``; None gives the identity)."""
    if block is None:
        return Compose()
    TRANSFORMS.check_block(block, where)
    if block["type"] != "Compose":
        # A single transform in place of a pipeline: wrap it so the dataset always gets a Compose.
        return Compose([TRANSFORMS.build(block, where)])
    ops = _build_ops(block.get("ops"), where)
    names = [type(op).__name__ for op in ops]
    policy = _check_policy(dict(block.get("policy") or {"name": "default"}), names, where, warn=False)
    return Compose(ops, policy)


def _build_ops(
    ops: Sequence[Mapping[str, Any] | Callable[..., Any]] | None, where: str
) -> list[Callable[..., Any]]:
    if ops is not None and (isinstance(ops, (str, Mapping)) or not isinstance(ops, Sequence)):
        raise ConfigError(f"{where}.ops must be a list of {{type: Name, ...}} blocks, got {ops!r}.")
    built = []
    for index, op in enumerate(ops or ()):
        if isinstance(op, Mapping):
            built.append(TRANSFORMS.build(op, where=f"{where}.ops[{index}]"))
        elif callable(op):
            built.append(op)
        else:
            raise ConfigError(f"{where}.ops[{index}]: expected a {{type: Name, ...}} block, got {op!r}.")
    return built


def _check_policy(
    policy: dict[str, Any], op_names: list[str], where: str, warn: bool = True
) -> dict[str, Any]:
    name = policy.get("name", "default")
    if name not in _POLICY_KEYS:
        raise ConfigError(
            f"{where}.policy.name: unknown policy '{name}'.{did_you_mean(str(name), _POLICY_KEYS)} "
            f"Known policies: {', '.join(_POLICY_KEYS)}."
        )
    allowed = _POLICY_KEYS[name]
    for key in policy:
        if key not in allowed:
            raise ConfigError(
                f"{where}.policy.{key} is not a setting of the '{name}' policy.{did_you_mean(key, allowed)} "
                f"Settings: {', '.join(sorted(allowed))}."
            )
    if name == "stop_epoch":
        missing = {"epoch", "ops"} - set(policy)
        if missing:
            raise ConfigError(f"{where}.policy: the stop_epoch policy needs {', '.join(sorted(missing))}.")
        if not isinstance(policy["epoch"], int):
            raise ConfigError(f"{where}.policy.epoch must be an int (e.g. 72), got {policy['epoch']!r}.")
        policy["ops"] = list(policy["ops"] or [])
        for op_name in policy["ops"]:
            if op_name not in TRANSFORMS:
                raise ConfigError(
                    f"{where}.policy.ops: '{op_name}' is not a transform."
                    f"{did_you_mean(op_name, TRANSFORMS.names)} "
                    f"Ops in this pipeline: {', '.join(op_names)}."
                )
            if warn and op_name not in op_names and (where, op_name) not in _warned:
                _warned.add((where, op_name))
                logger.warning(
                    "%s.policy.ops names %s, which is not in ops; nothing to stop.", where, op_name
                )
    return {**policy, "name": name}
