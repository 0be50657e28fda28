"""Build the model, criterion and post-processor from a resolved config, and any registered block.

Values several components need (``num_classes``, ``eval_spatial_size``, ``use_focal_loss``) live once at the
top level of the config; this module hands them over explicitly, so reading a builder tells who gets what.
:func:`build_block` checks that what a builder hands over is what ``schema.BLOCKS`` says, the table that
validation reads too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dfine.config.loading import Config
from dfine.config.registry import ConfigError
from dfine.config.schema import block_spec

__all__ = ["build_block", "build_criterion", "build_model", "build_postprocessor"]


def _where(cfg: Mapping[str, Any], path: str) -> str:
    return cfg.where(path) if isinstance(cfg, Config) else path


def build_block(path: str, block: Mapping[str, Any], where: str = "", **given: Any) -> Any:
    """Build the registered block that sits at ``path`` with the values its builder hands over.

    Args:
        path: the block's entry in ``schema.BLOCKS`` (e.g. ``"model.decoder"``, ``"optimizer"``).
        block: ``{type: Name, **kwargs}``; keys the entry lists as ``nested`` are dropped, because ``given``
            carries what the builder made of them.
        where: ``file: key.path`` for messages (default: ``path``).
        given: exactly the entry's ``provided`` and ``nested`` arguments.

    Returns:
        The constructed object.

    Raises:
        ConfigError: the block does not fit the constructor (see ``Registry.build``). An exception raised
            inside the constructor propagates unchanged.
    """
    spec = block_spec(path)
    expected = {*spec.provided, *spec.nested}
    assert set(given) == expected, (
        f"the builder of {path} passes {sorted(given)} but schema.BLOCKS lists {sorted(expected)}; "
        "update the table and the builder together"
    )
    outer = {key: value for key, value in block.items() if key not in spec.nested}
    return spec.registry.build(outer, where or path, **given)


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ConfigError(f"{_where(cfg, key)} is missing: the config must set '{key}' at the top level.")
    return cfg[key]


def _spatial_size(cfg: Mapping[str, Any]) -> list[int] | None:
    size = cfg.get("eval_spatial_size")
    return list(size) if size is not None else None


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the detector described by ``cfg["model"]`` (``{type: DFINE, backbone, encoder, decoder}``).

    The backbone is built first; the encoder's ``in_channels`` and ``feat_strides`` are checked against what
    the backbone returns, because a mismatch there otherwise surfaces as an opaque conv shape error.
    """
    block = dict(_require(cfg, "model"))
    parts = {}
    for name in ("backbone", "encoder", "decoder"):
        if not isinstance(block.get(name), Mapping):
            raise ConfigError(
                f"{_where(cfg, 'model.' + name)} is missing: model needs a {{type: ...}} block '{name}'."
            )
    num_classes = _require(cfg, "num_classes")
    size = _spatial_size(cfg)
    parts["backbone"] = build_block("model.backbone", block["backbone"], _where(cfg, "model.backbone"))
    _check_encoder_inputs(cfg, parts["backbone"], block["encoder"])
    parts["encoder"] = build_block(
        "model.encoder", block["encoder"], _where(cfg, "model.encoder"), eval_spatial_size=size
    )
    parts["decoder"] = build_block(
        "model.decoder",
        block["decoder"],
        _where(cfg, "model.decoder"),
        num_classes=num_classes,
        eval_spatial_size=size,
    )
    return build_block("model", block, _where(cfg, "model"), **parts)


def _check_encoder_inputs(cfg: Mapping[str, Any], backbone: nn.Module, encoder: Mapping[str, Any]) -> None:
    channels = getattr(backbone, "out_channels", None)
    strides = getattr(backbone, "out_strides", None)
    if channels is not None and "in_channels" in encoder and list(encoder["in_channels"]) != list(channels):
        raise ConfigError(
            f"{_where(cfg, 'model.encoder.in_channels')} is {list(encoder['in_channels'])} "
            f"but the backbone returns feature maps with {list(channels)} channels "
            f"(return_idx {getattr(backbone, 'return_idx', '?')}); "
            f"set model.encoder.in_channels: {list(channels)}."
        )
    if strides is not None and "feat_strides" in encoder and list(encoder["feat_strides"]) != list(strides):
        raise ConfigError(
            f"{_where(cfg, 'model.encoder.feat_strides')} is {list(encoder['feat_strides'])} "
            "but the backbone's "
            f"feature strides are {list(strides)}; set model.encoder.feat_strides: {list(strides)}."
        )


def build_criterion(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the training loss ``cfg["criterion"]`` with its ``matcher`` block built first."""
    block = _require(cfg, "criterion")
    matcher_block = block.get("matcher")
    if not isinstance(matcher_block, Mapping):
        raise ConfigError(
            f"{_where(cfg, 'criterion.matcher')} is missing: the criterion needs a matcher block."
        )
    matcher = build_block(
        "criterion.matcher",
        matcher_block,
        _where(cfg, "criterion.matcher"),
        use_focal_loss=cfg.get("use_focal_loss", True),
    )
    return build_block(
        "criterion",
        block,
        _where(cfg, "criterion"),
        matcher=matcher,
        num_classes=_require(cfg, "num_classes"),
    )


def build_postprocessor(cfg: Mapping[str, Any]) -> nn.Module:
    """Build ``cfg["postprocessor"]`` (scores, top-k, boxes in pixels) with the shared class settings."""
    return build_block(
        "postprocessor",
        _require(cfg, "postprocessor"),
        _where(cfg, "postprocessor"),
        num_classes=_require(cfg, "num_classes"),
        use_focal_loss=cfg.get("use_focal_loss", True),
        remap_mscoco_category=cfg.get("remap_mscoco_category", False),
    )
