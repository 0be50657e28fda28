"""``Compose``: the transform pipeline of a dataset block, with D-FINE's stop-epoch policy and DEIM's stages.

The block loads unchanged from the original configs::

    transforms:
      type: Compose
      ops:
        - {type: RandomPhotometricDistort, p: 0.5}
        - ...
      policy: {name: stop_epoch, epoch: 72, ops: [RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop]}

From epoch ``policy.epoch`` on, the ops named in ``policy.ops`` are skipped (matched by their config
``type``), which is how D-FINE's second training stage sees clean, lightly augmented images.

DEIM's policy gives three epochs, ``policy.epoch: [4, 29, 50]``, and ``mosaic_prob`` beside ``ops``:

* epochs ``< 4`` and ``>= 50``: the ops in ``policy.ops`` are off (a light warm-up and the no-aug stage);
* ``[4, 29)``: each sample takes ``Mosaic`` with probability ``mosaic_prob``; a sample that does skips
  ``RandomZoomOut`` and ``RandomIoUCrop`` (mosaic tiles are already small), one that does not runs them;
* ``[29, 50)``: everything but ``Mosaic``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dfine.config.registry import TRANSFORMS, ConfigError, did_you_mean

__all__ = ["Compose", "build_transforms"]

logger = logging.getLogger(__name__)

_warned: set[tuple[str, str]] = set()  # one warning per pipeline and op, however often it is built
_POLICY_KEYS = {"default": {"name"}, "stop_epoch": {"name", "epoch", "ops"}}
# ops a sample that took Mosaic skips in DEIM's mosaic stage (its tiles are already zoomed out and cropped)
_NOT_WITH_MOSAIC = ("RandomZoomOut", "RandomIoUCrop")


@TRANSFORMS.register()
class Compose:
    """Apply ``ops`` in order to ``(image, target)``, skipping the policy's ops from its epoch on.

    Args:
        ops: transform blocks ``{type: Name, **args}`` (built through the ``TRANSFORMS`` registry) or already
            built transforms; None or empty: the identity.
        policy: None / ``{name: default}`` (all ops always), or
            ``{name: stop_epoch, epoch: E, ops: [names]}``, or DEIM's ``epoch: [start, mosaic_stop, stop]``.
        mosaic_prob: with a three-epoch policy, the chance that a sample of the mosaic stage takes ``Mosaic``
            (DEIM: 0.5; negative: never).
    """

    def __init__(
        self,
        ops: Sequence[Mapping[str, Any] | Callable[..., Any]] | None = None,
        policy: Mapping[str, Any] | None = None,
        mosaic_prob: float = -0.1,
    ) -> None:
        self.ops = _build_ops(ops, "transforms")
        # Registered names are the class names, so the policy can match built ops by their type's name.
        self.op_names = [type(op).__name__ for op in self.ops]
        self.policy = _check_policy(dict(policy or {"name": "default"}), self.op_names, "transforms")
        self.mosaic_prob = float(mosaic_prob)
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Epoch used when the caller passes none (the dataset passes its own, shared with loader workers)."""
        self.epoch = epoch

    def active(self, epoch: int, with_mosaic: bool = False) -> list[bool]:
        """Which ops run at ``epoch`` (for a sample that took Mosaic, with a three-epoch policy)."""
        if self.policy["name"] != "stop_epoch":
            return [True] * len(self.ops)
        stopped = set(self.policy["ops"])
        epochs = self.policy["epoch"]
        if isinstance(epochs, int):
            return [epoch < epochs or name not in stopped for name in self.op_names]
        start, _, stop = epochs
        flags = []
        for name in self.op_names:
            if name in stopped and not start <= epoch < stop:
                flags.append(False)
            elif name == "Mosaic":
                flags.append(with_mosaic)
            else:
                flags.append(not (with_mosaic and name in _NOT_WITH_MOSAIC))
        return flags

    def mosaic_stage(self, epoch: int) -> bool:
        """Whether ``epoch`` is in the mosaic stage ``[epoch[0], epoch[1])`` of a three-epoch policy."""
        epochs = self.policy.get("epoch")
        return (
            self.policy["name"] == "stop_epoch"
            and isinstance(epochs, list)
            and epochs[0] <= epoch < epochs[1]
        )

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
        # one draw per sample in the mosaic stage only, as DEIM
        with_mosaic = target is not None and self.mosaic_stage(epoch) and random.random() <= self.mosaic_prob
        for op, active in zip(self.ops, self.active(epoch, with_mosaic), strict=True):
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
        return (
            "Compose(\n" + "\n".join(lines) + f"\n  policy={self.policy}, mosaic_prob={self.mosaic_prob}\n)"
        )


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
    return Compose(ops, policy, block.get("mosaic_prob", -0.1))


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
        policy["epoch"] = _check_policy_epoch(policy["epoch"], where)
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


def _check_policy_epoch(epoch: Any, where: str) -> int | list[int]:
    """An int (D-FINE) or three increasing ints (DEIM's stages)."""
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        return epoch
    is_three = isinstance(epoch, (list, tuple)) and len(epoch) == 3 and all(isinstance(e, int) for e in epoch)
    if is_three and list(epoch) == sorted(epoch):
        return list(epoch)
    raise ConfigError(
        f"{where}.policy.epoch must be an int (D-FINE, e.g. 72) or three increasing epochs "
        f"[start, mosaic_stop, stop] (DEIM, e.g. [4, 29, 50]), got {epoch!r}."
    )
