"""Build a HuggingFace ``DFineConfig`` from our resolved config, and read the layout facts both sides share.

Our config blocks are the constructors' keyword arguments (the original D-FINE names); arguments a block
leaves out take the constructor's default, read from the registered class. A setting HF's
``DFineForObjectDetection`` cannot express (another backbone, a class-agnostic query selection, an
``eval_idx`` before the last layer, ...) raises ``ValueError`` rather than producing a model that silently
computes something else.

Settings with no HF counterpart and no effect on the forward pass are ignored: ``freeze_at`` and
``freeze_stem_only`` (which parameters train) and ``pretrained`` (where the backbone's start weights come
from).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dfine.config.registry import MODELS, constructor_arguments

if TYPE_CHECKING:
    from transformers import DFineConfig

__all__ = ["LayoutFacts", "hf_config_from_dfine_config", "import_transformers", "layout_facts"]

logger = logging.getLogger(__name__)

_EXPECTED_TYPES = {"backbone": "HGNetv2", "encoder": "HybridEncoder", "decoder": "DFINETransformer"}
# HF hard-codes these: the ELAN blocks' activation, the MLP heads' activation, the anchor validity margin.
_HF_FIXED = {("encoder", "act"): "silu", ("decoder", "mlp_act"): "relu", ("decoder", "eps"): 1e-2}


@dataclass(frozen=True)
class LayoutFacts:
    """What the state-dict conversion needs to know beyond the keys themselves.

    Attributes:
        backbone_frozen_norm: backbone BatchNorms are frozen (no ``num_batches_tracked`` keys).
        eval_spatial_size: (H, W) the ``decoder.anchors`` buffers are made for, or None (no such buffers).
        feat_strides: stride of every decoder level (extra levels double the last stride).
        eps: anchors with a coordinate outside (eps, 1 - eps) are invalid.
    """

    backbone_frozen_norm: bool
    eval_spatial_size: tuple[int, int] | None
    feat_strides: tuple[int, ...]
    eps: float


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "HuggingFace conversion needs the optional 'hf' extra: pip install -e \".[hf]\" "
            "(installs transformers and safetensors)."
        ) from error
    return transformers


def _block(cfg: Mapping[str, Any], part: str) -> dict[str, Any]:
    """``cfg["model"][part]`` with the constructor's defaults filled in."""
    model = cfg.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get(part), Mapping):
        raise ValueError(
            f"config has no model.{part} block; pass the resolved config of dfine.load_config()."
        )
    block = dict(model[part])
    expected = _EXPECTED_TYPES[part]
    if block.get("type") != expected:
        raise ValueError(
            f"model.{part}.type is {block.get('type')!r}; HuggingFace's DFineForObjectDetection only has the "
            f"{expected} {part}."
        )
    _register_model_parts()
    if expected in MODELS:
        for name, parameter in constructor_arguments(MODELS.get(expected)).items():
            if parameter.default is not inspect.Parameter.empty:
                block.setdefault(name, parameter.default)
    return block


def _register_model_parts() -> None:
    # the defaults of blocks come from the registered constructors
    from dfine.models import decoder, hgnetv2, hybrid_encoder  # noqa: F401


def _extended_strides(strides: Sequence[int], num_levels: int) -> tuple[int, ...]:
    strides = list(strides)
    while len(strides) < num_levels:
        strides.append(strides[-1] * 2)
    return tuple(strides)


def layout_facts(cfg: Mapping[str, Any] | DFineConfig) -> LayoutFacts:
    """Read :class:`LayoutFacts` from our resolved config or from a ``DFineConfig``."""
    if isinstance(cfg, Mapping):
        backbone, decoder = _block(cfg, "backbone"), _block(cfg, "decoder")
        size = cfg.get("eval_spatial_size")
        return LayoutFacts(
            backbone_frozen_norm=bool(backbone["freeze_norm"]),
            eval_spatial_size=(int(size[0]), int(size[1])) if size is not None else None,
            feat_strides=_extended_strides(decoder["feat_strides"], decoder["num_levels"]),
            eps=float(decoder["eps"]),
        )
    size = cfg.anchor_image_size
    return LayoutFacts(
        backbone_frozen_norm=bool(cfg.freeze_backbone_batch_norms),
        eval_spatial_size=(int(size[0]), int(size[1])) if size else None,
        feat_strides=_extended_strides(cfg.feat_strides, cfg.num_feature_levels),
        eps=1e-2,
    )


def _backbone_config(transformers: Any, backbone: Mapping[str, Any]) -> Any:
    from dfine.models.hgnetv2 import VARIANTS

    name = backbone["name"]
    if name not in VARIANTS:
        raise ValueError(f"model.backbone.name {name!r} is not an HGNetv2 variant ({', '.join(VARIANTS)}).")
    variant = VARIANTS[name]
    stages = variant.stages
    out_channels = [stage.out_channels for stage in stages]
    return transformers.HGNetV2Config(
        stem_channels=list(variant.stem_channels),
        stage_in_channels=[stage.in_channels for stage in stages],
        stage_mid_channels=[stage.mid_channels for stage in stages],
        stage_out_channels=out_channels,
        stage_num_blocks=[stage.num_blocks for stage in stages],
        stage_downsample=[stage.downsample for stage in stages],
        stage_light_block=[stage.light_block for stage in stages],
        stage_kernel_size=[stage.kernel_size for stage in stages],
        stage_numb_of_layers=[stage.layers_per_block for stage in stages],
        use_learnable_affine_block=bool(backbone["use_lab"]),
        # HF numbers the stem 0, so our stage i is HF's feature i + 1
        out_indices=[int(i) + 1 for i in backbone["return_idx"]],
        depths=[stage.num_blocks for stage in stages],
        hidden_sizes=out_channels,
        embedding_size=variant.stem_channels[2],
        hidden_act="relu",
    )


def _check_supported(encoder: Mapping[str, Any], decoder: Mapping[str, Any]) -> None:
    """Raise for settings HF's model would silently compute differently."""
    for (part, key), value in _HF_FIXED.items():
        block = encoder if part == "encoder" else decoder
        if block[key] != value:
            raise ValueError(
                f"model.{part}.{key} is {block[key]!r}; HuggingFace's D-FINE only supports {value!r}."
            )
    if decoder["query_select_method"] != "default":
        raise ValueError(
            f"model.decoder.query_select_method {decoder['query_select_method']!r} has no HuggingFace "
            "counterpart; only 'default' converts."
        )
    num_layers, eval_idx = decoder["num_layers"], decoder["eval_idx"]
    if (eval_idx if eval_idx >= 0 else num_layers + eval_idx) != num_layers - 1:
        raise ValueError(
            f"model.decoder.eval_idx {eval_idx} is not the last of {num_layers} layers; HuggingFace's "
            "DFineForObjectDetection is built for eval_idx -1 only."
        )
    channels = list(decoder["feat_channels"])
    if len(set(channels)) != 1 and channels != [decoder["hidden_dim"]] * len(channels):
        raise ValueError(
            f"model.decoder.feat_channels {channels} differ per level; HuggingFace's D-FINE projects every "
            "level from the last level's channel count."
        )
    if decoder["num_levels"] - len(channels) > 1:
        raise ValueError(
            f"model.decoder.num_levels {decoder['num_levels']} adds more than one level to the "
            f"{len(channels)} encoder maps; HuggingFace computes the extra levels differently."
        )
    if encoder["dropout"] != decoder["dropout"]:
        logger.warning(
            "encoder dropout %s and decoder dropout %s differ; HF's DFineConfig has one `dropout` (the "
            "decoder's is used). Eval outputs are unaffected.",
            encoder["dropout"],
            decoder["dropout"],
        )


def _loss_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Loss and matcher weights, for HF's own loss (only when the config has a criterion block)."""
    criterion = cfg.get("criterion")
    if not isinstance(criterion, Mapping):
        return {}
    settings: dict[str, Any] = {}
    weights = criterion.get("weight_dict") or {}
    for name in ("vfl", "bbox", "giou", "fgl", "ddf"):
        if f"loss_{name}" in weights:
            settings[f"weight_loss_{name}"] = float(weights[f"loss_{name}"])
    for name in ("alpha", "gamma"):
        if name in criterion:
            settings[f"focal_loss_{name}"] = float(criterion[name])
    matcher = criterion.get("matcher") or {}
    costs = matcher.get("weight_dict") or {}
    for name in ("class", "bbox", "giou"):
        if f"cost_{name}" in costs:
            settings[f"matcher_{name}_cost"] = float(costs[f"cost_{name}"])
    for name in ("alpha", "gamma"):
        if name in matcher:
            settings[f"matcher_{name}"] = float(matcher[name])
    return settings


def hf_config_from_dfine_config(cfg: Mapping[str, Any]) -> DFineConfig:
    """The ``DFineConfig`` (with its ``HGNetV2Config`` backbone) of the model ``cfg`` describes.

    ``eval_size`` and ``anchor_image_size`` stay unset: HF then builds the encoder position embedding and the
    anchors for each input's size, as our model does for sizes other than ``eval_spatial_size`` (setting
    ``eval_size`` would make HF drop the position embedding in eval).

    Args:
        cfg: our resolved config: ``num_classes`` and ``model.{backbone, encoder, decoder}`` blocks.

    Returns:
        A ``transformers.DFineConfig``.

    Raises:
        ImportError: transformers is not installed (``pip install -e ".[hf]"``).
        ValueError: a setting HF's D-FINE cannot express.
    """
    transformers = import_transformers()
    backbone, encoder, decoder = (_block(cfg, part) for part in ("backbone", "encoder", "decoder"))
    _check_supported(encoder, decoder)
    if "num_classes" not in cfg:
        raise ValueError("config has no top-level num_classes.")
    num_points = decoder["num_points"]
    return transformers.DFineConfig(
        backbone_config=_backbone_config(transformers, backbone),
        num_labels=int(cfg["num_classes"]),
        freeze_backbone_batch_norms=bool(backbone["freeze_norm"]),
        # hybrid encoder
        encoder_hidden_dim=encoder["hidden_dim"],
        encoder_in_channels=list(encoder["in_channels"]),
        feat_strides=list(encoder["feat_strides"]),
        encoder_layers=encoder["num_encoder_layers"],
        encoder_ffn_dim=encoder["dim_feedforward"],
        encoder_attention_heads=encoder["nhead"],
        encode_proj_layers=list(encoder["use_encoder_idx"]),
        positional_encoding_temperature=encoder["pe_temperature"],
        encoder_activation_function=encoder["enc_act"],
        activation_function=encoder["act"],
        hidden_expansion=encoder["expansion"],
        depth_mult=encoder["depth_mult"],
        normalize_before=False,
        eval_size=None,
        # decoder
        d_model=decoder["hidden_dim"],
        num_queries=decoder["num_queries"],
        decoder_in_channels=list(decoder["feat_channels"]),
        decoder_ffn_dim=decoder["dim_feedforward"],
        num_feature_levels=decoder["num_levels"],
        decoder_n_points=list(num_points) if isinstance(num_points, Sequence) else int(num_points),
        decoder_layers=decoder["num_layers"],
        decoder_attention_heads=decoder["nhead"],
        decoder_activation_function=decoder["activation"],
        dropout=decoder["dropout"],
        attention_dropout=decoder["dropout"],
        num_denoising=decoder["num_denoising"],
        label_noise_ratio=decoder["label_noise_ratio"],
        box_noise_scale=decoder["box_noise_scale"],
        learn_initial_query=bool(decoder["learn_query_content"]),
        anchor_image_size=None,
        eval_idx=decoder["eval_idx"],
        layer_scale=decoder["layer_scale"],
        max_num_bins=decoder["reg_max"],
        reg_scale=float(decoder["reg_scale"]),
        decoder_method=decoder["cross_attn_method"],
        auxiliary_loss=bool(decoder["aux_loss"]),
        use_focal_loss=bool(cfg.get("use_focal_loss", True)),
        **_loss_settings(cfg),
    )
