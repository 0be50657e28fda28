"""Move D-FINE weights between our layout (= the original D-FINE checkpoints) and HuggingFace's.

HuggingFace ``transformers`` ships the same network as ``DFineForObjectDetection``. Its parameters hold the
same numbers under other names, with three differences of layout:

* attention input projections: ours is one fused ``self_attn.in_proj_weight`` [3D, D] (query, key, value
  rows in that order), HF keeps ``q_proj``, ``k_proj`` and ``v_proj`` [D, D] each;
* shared tensors: ``decoder.up`` / ``decoder.reg_scale`` are the same parameters as
  ``decoder.decoder.up`` / ``decoder.decoder.reg_scale`` (one HF key each), and HF repeats the decoder's class
  and box heads at the top level (``class_embed.*``, ``bbox_embed.*``, tied to ``model.decoder.*``);
* buffers HF does not store: the decoder's ``anchors`` / ``valid_mask`` (HF computes anchors per input,
  or keeps them as plain attributes) are dropped on the way to HF and recomputed from ``eval_spatial_size`` on
  the way back. Backbone ``num_batches_tracked`` exist on a side only when its backbone BatchNorms are not
  frozen (our ``freeze_norm``, HF's ``freeze_backbone_batch_norms``): they are dropped, or added as zeros.

Files written by ``save_pretrained`` (and HF hub checkpoints) use transformers' older module names
(``out_proj``, ``fc1``/``fc2``, ``encoder.encoder``); :func:`hf_to_dfine_state_dict` reads both spellings.

Outputs agree (to ~1e-5) for square inputs only: for an H != W feature map the HF port numbers the encoder's
position embedding row by row, while the original D-FINE (and so our model and every published checkpoint)
uses its own ordering, which equals the row-major one only when H == W.

The key table below was derived by building both models for the same architecture and matching key lists and
shapes; the parity tests (tests/hf/test_conversion.py) check it by running both models on the same weights.

``transformers`` is an optional extra (``pip install -e ".[hf]"``); it is imported only inside the functions
that need it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dfine.hf.config import LayoutFacts, hf_config_from_dfine_config, import_transformers, layout_facts

if TYPE_CHECKING:
    from transformers import DFineConfig

__all__ = [
    "dfine_to_hf_state_dict",
    "hf_config_from_dfine_config",
    "hf_to_dfine_state_dict",
    "load_hf_pretrained",
    "save_hf_pretrained",
]

logger = logging.getLogger(__name__)

_INT = "{}"  # placeholder for a module-list index in the rule prefixes below


@dataclass(frozen=True)
class _Rule:
    """``ours`` and ``hf`` are key prefixes (ending in '.') or whole keys, with ``{}`` for list indices.

    The rest of a key after its prefix is carried over, with ``heads`` renaming its leading part (first match
    wins) and ``tokens`` renaming single dot-separated words anywhere in it.
    """

    ours: str
    hf: str
    heads: tuple[tuple[str, str], ...] = ()
    tokens: tuple[tuple[str, str], ...] = ()

    def pattern(self, to_hf: bool) -> re.Pattern[str]:
        source = self.ours if to_hf else self.hf
        body = r"(\d+)".join(re.escape(part) for part in source.split(_INT))
        return re.compile("^" + body + ("" if source.endswith(".") else "$"))

    def target(self, to_hf: bool, indices: tuple[str, ...]) -> str:
        return (self.hf if to_hf else self.ours).format(*indices)

    def rest(self, rest: str, to_hf: bool) -> str:
        for ours_head, hf_head in self.heads:
            source, target = (ours_head, hf_head) if to_hf else (hf_head, ours_head)
            if rest.startswith(source):
                rest = target + rest[len(source) :]
                break
        if self.tokens:
            renames = dict(self.tokens) if to_hf else {hf: ours for ours, hf in self.tokens}
            rest = ".".join(renames.get(word, word) for word in rest.split("."))
        return rest


# Inside an AIFI encoder layer / a decoder layer (the fused `self_attn.in_proj_*` are split separately).
_ENCODER_LAYER = (
    ("self_attn.out_proj.", "self_attn.o_proj."),
    ("linear1.", "mlp.layers.0."),
    ("linear2.", "mlp.layers.1."),
    ("norm1.", "self_attn_layer_norm."),
    ("norm2.", "final_layer_norm."),
)
_DECODER_LAYER = (
    ("self_attn.out_proj.", "self_attn.o_proj."),
    ("cross_attn.", "encoder_attn."),
    ("linear1.", "mlp.layers.0."),
    ("linear2.", "mlp.layers.1."),
    ("norm1.", "self_attn_layer_norm."),
    ("norm3.", "final_layer_norm."),
)
# Inside an ELAN fusion block: our two Sequential branches (CSP layer, conv) are four named HF modules.
_ELAN_BLOCK = (
    ("cv1.", "conv1."),
    ("cv2.0.", "csp_rep1."),
    ("cv2.1.", "conv2."),
    ("cv3.0.", "csp_rep2."),
    ("cv3.1.", "conv3."),
    ("cv4.", "conv4."),
)
_BACKBONE_WORDS = (("conv", "convolution"), ("bn", "normalization"))
_PROJECTION = (("conv.", "0."), ("norm.", "1."))

_RULES: tuple[_Rule, ...] = (
    # backbone (HGNetv2)
    _Rule("backbone.stem.", "model.backbone.model.embedder.", tokens=_BACKBONE_WORDS),
    _Rule("backbone.stages.", "model.backbone.model.encoder.stages.", tokens=_BACKBONE_WORDS),
    # encoder (HybridEncoder)
    _Rule("encoder.input_proj.{}.", "model.encoder_input_proj.{}.", heads=_PROJECTION),
    _Rule("encoder.encoder.{}.layers.{}.", "model.encoder.aifi.{}.layers.{}.", heads=_ENCODER_LAYER),
    _Rule("encoder.lateral_convs.", "model.encoder.lateral_convs."),
    _Rule("encoder.fpn_blocks.{}.", "model.encoder.fpn_blocks.{}.", heads=_ELAN_BLOCK),
    _Rule("encoder.pan_blocks.{}.", "model.encoder.pan_blocks.{}.", heads=_ELAN_BLOCK),
    _Rule(
        "encoder.downsample_convs.{}.0.",
        "model.encoder.downsample_convs.{}.",
        heads=(("cv1.", "conv1."), ("cv2.", "conv2.")),
    ),
    # decoder (DFINETransformer): shared W(n) constants, one HF key for two of ours
    _Rule("decoder.up", "model.decoder.up"),
    _Rule("decoder.decoder.up", "model.decoder.up"),
    _Rule("decoder.reg_scale", "model.decoder.reg_scale"),
    _Rule("decoder.decoder.reg_scale", "model.decoder.reg_scale"),
    _Rule("decoder.input_proj.{}.", "model.decoder_input_proj.{}.", heads=_PROJECTION),
    _Rule("decoder.decoder.layers.{}.", "model.decoder.layers.{}.", heads=_DECODER_LAYER),
    _Rule("decoder.decoder.lqe_layers.", "model.decoder.lqe_layers."),
    _Rule("decoder.denoising_class_embed.", "model.denoising_class_embed."),
    _Rule("decoder.tgt_embed.", "model.weight_embedding."),
    _Rule("decoder.query_pos_head.", "model.decoder.query_pos_head."),
    _Rule("decoder.enc_output.", "model.enc_output.", heads=(("proj.", "0."), ("norm.", "1."))),
    _Rule("decoder.enc_score_head.", "model.enc_score_head."),
    _Rule("decoder.enc_bbox_head.", "model.enc_bbox_head."),
    _Rule("decoder.pre_bbox_head.", "model.decoder.pre_bbox_head."),
    # per-layer heads, which HF also exposes (tied) at the top level
    _Rule("decoder.dec_score_head.", "model.decoder.class_embed."),
    _Rule("decoder.dec_score_head.", "class_embed."),
    _Rule("decoder.dec_bbox_head.", "model.decoder.bbox_embed."),
    _Rule("decoder.dec_bbox_head.", "bbox_embed."),
)

# Recomputed from the config on the way back; HF has no such tensors in its state dict.
_DROPPED_FOR_HF = ("decoder.anchors", "decoder.valid_mask")
_FUSED = re.compile(r"^(.*\.self_attn\.)in_proj_(weight|bias)$")
_SPLIT = re.compile(r"^(.*\.self_attn\.)([qkv])_proj\.(weight|bias)$")
_QKV = ("q", "k", "v")
# Files written by ``save_pretrained`` (and the D-FINE checkpoints on the HF hub) keep transformers' older
# module names; ``from_pretrained`` renames them on load, and so does hf_to_dfine_state_dict.
_HF_FILE_NAMES = (
    (re.compile(r"\.out_proj\."), ".o_proj."),
    (re.compile(r"\.layers\.(\d+)\.fc([12])\."), lambda m: f".layers.{m[1]}.mlp.layers.{int(m[2]) - 1}."),
    (re.compile(r"^model\.encoder\.encoder\.(\d+)\.layers\."), r"model.encoder.aifi.\1.layers."),
)


def _current_hf_name(key: str) -> str:
    for pattern, replacement in _HF_FILE_NAMES:
        key = pattern.sub(replacement, key)
    return key


def _rename(key: str, to_hf: bool) -> list[str]:
    """All keys that ``key`` maps to (several for shared or tied tensors; none if unknown)."""
    targets = []
    for rule in _RULES:
        match = rule.pattern(to_hf).match(key)
        if match:
            targets.append(rule.target(to_hf, match.groups()) + rule.rest(key[match.end() :], to_hf))
    return targets


def _put(result: dict[str, Tensor], key: str, value: Tensor, source: str) -> None:
    """Store ``value`` under ``key``; a key reached twice (shared/tied tensors) must get equal values."""
    if key in result:
        if result[key].shape != value.shape or not torch.equal(result[key], value):
            raise ValueError(
                f"'{key}' is reached from two tensors that should be one shared tensor but differ "
                f"(the second from '{source}'); the state dict is inconsistent."
            )
        return
    result[key] = value


def _unknown(keys: list[str], to_hf: bool) -> ValueError:
    side, expect = (
        ("D-FINE", "backbone., encoder., decoder.") if to_hf else ("HuggingFace", "model., class_embed.")
    )
    hint = ""
    if any(k.startswith("module.") for k in keys):
        hint = " Keys start with 'module.': strip that prefix (a DistributedDataParallel checkpoint)."
    shown = ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")
    return ValueError(
        f"{len(keys)} key(s) are not part of the {side} layout (expected keys starting with {expect}): "
        f"{shown}.{hint}"
    )


def dfine_to_hf_state_dict(
    sd: Mapping[str, Tensor], cfg: Mapping[str, Any] | DFineConfig
) -> dict[str, Tensor]:
    """Convert a state dict from our (= original D-FINE) layout to ``DFineForObjectDetection``'s.

    Tensors are carried over unchanged (the same objects) except the fused attention projections, which are
    split into query/key/value rows (copies). ``decoder.anchors`` / ``decoder.valid_mask`` are dropped (HF
    computes anchors itself), and backbone ``num_batches_tracked`` are dropped when the config freezes the
    backbone BatchNorms (HF's frozen BatchNorm has none).

    Args:
        sd: our state dict (``model.state_dict()``, ``checkpoint["model"]`` or
            ``checkpoint["ema"]["module"]``).
        cfg: our resolved config (``dfine.load_config``), or the target ``DFineConfig``.

    Returns:
        The HF state dict; loads into ``DFineForObjectDetection(hf_config_from_dfine_config(cfg))`` with
        ``strict=True``.

    Raises:
        ValueError: keys that are not part of our layout (all listed), or shared tensors that differ.
    """
    facts = layout_facts(cfg)
    result: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _DROPPED_FOR_HF or (
            facts.backbone_frozen_norm and _is_backbone_step_count(key, "backbone.")
        ):
            continue
        fused = _FUSED.match(key)
        if fused:
            # the layer's HF prefix, found through the sibling output projection
            key_hf = _rename(fused.group(1) + "out_proj.weight", to_hf=True)
            if not key_hf:
                unknown.append(key)
                continue
            prefix = key_hf[0][: -len("o_proj.weight")]
            for name, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                _put(result, f"{prefix}{name}_proj.{fused.group(2)}", part.clone(), key)
            continue
        targets = _rename(key, to_hf=True)
        if not targets:
            unknown.append(key)
        for target in targets:
            _put(result, target, value, key)
    if unknown:
        raise _unknown(unknown, to_hf=True)
    return result


def hf_to_dfine_state_dict(
    sd: Mapping[str, Tensor], cfg: Mapping[str, Any] | DFineConfig
) -> dict[str, Tensor]:
    """Convert a ``DFineForObjectDetection`` state dict to our (= original D-FINE) layout.

    The inverse of :func:`dfine_to_hf_state_dict`: ``dfine -> hf -> dfine`` gives back every tensor bit for
    bit.
    Query/key/value projections are concatenated into ``in_proj_*``; the shared ``up`` / ``reg_scale`` are
    written under both of our keys; HF's top-level ``class_embed`` / ``bbox_embed`` copies may be absent (as
    in a saved ``model.safetensors``) and must equal ``model.decoder.*`` when present. ``decoder.anchors`` /
    ``decoder.valid_mask`` are recomputed for the config's ``eval_spatial_size`` (none without one), and
    backbone ``num_batches_tracked`` are added as zeros when our backbone BatchNorms are not frozen.

    Args:
        sd: an HF state dict: ``model.state_dict()``, or the tensors of a ``model.safetensors`` file, whose
            older module names (``out_proj``, ``fc1``, ``encoder.encoder``) are accepted too.
        cfg: our resolved config, or the ``DFineConfig`` the weights come with (anchors then follow its
            ``anchor_image_size``).

    Returns:
        Our state dict, loadable into ``dfine.build_model(cfg)`` with ``strict=True``.

    Raises:
        ValueError: keys that are not part of the HF layout (all listed), an incomplete q/k/v triple, or tied
            copies that differ.
    """
    facts = layout_facts(cfg)
    result: dict[str, Tensor] = {}
    fused_parts: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        key = _current_hf_name(key)
        split = _SPLIT.match(key)
        if split:
            targets = _rename(split.group(1) + "o_proj.weight", to_hf=False)
            if not targets:
                unknown.append(key)
                continue
            fused_key = targets[0][: -len("out_proj.weight")] + "in_proj_" + split.group(3)
            fused_parts.setdefault(fused_key, {})[split.group(2)] = value
            continue
        if _is_backbone_step_count(key, "model.backbone.") and facts.backbone_frozen_norm:
            continue
        targets = _rename(key, to_hf=False)
        if not targets:
            unknown.append(key)
        for target in targets:
            _put(result, target, value, key)
    if unknown:
        raise _unknown(unknown, to_hf=False)
    for fused_key, parts in fused_parts.items():
        missing = [name for name in _QKV if name not in parts]
        if missing:
            raise ValueError(f"'{fused_key}' needs q, k and v projections; {', '.join(missing)} missing.")
        result[fused_key] = torch.cat([parts[name] for name in _QKV], dim=0)
    if not facts.backbone_frozen_norm:
        _add_step_counts(result)
    result.update(_anchor_buffers(facts))
    return result


def _is_backbone_step_count(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key.endswith(".num_batches_tracked")


def _add_step_counts(result: dict[str, Tensor]) -> None:
    """Give each trainable backbone BatchNorm a ``num_batches_tracked`` (zero) if the source had none."""
    for key in [k for k in result if k.startswith("backbone.") and k.endswith(".running_var")]:
        result.setdefault(
            key[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long)
        )


def _anchor_buffers(facts: LayoutFacts) -> dict[str, Tensor]:
    if facts.eval_spatial_size is None:
        return {}
    from dfine.models.encoder_queries import make_anchors

    height, width = facts.eval_spatial_size
    shapes = [(int(height / stride), int(width / stride)) for stride in facts.feat_strides]
    anchors, valid_mask = make_anchors(shapes, facts.eps)
    return {"decoder.anchors": anchors, "decoder.valid_mask": valid_mask}


def save_hf_pretrained(
    model_state_dict: Mapping[str, Tensor],
    cfg: Mapping[str, Any],
    folder: str | Path,
    config_settings: Mapping[str, Any] | None = None,
) -> DFineConfig:
    """Write ``model.safetensors`` and ``config.json`` that ``DFineForObjectDetection.from_pretrained`` loads.

    The weights are loaded into a freshly built HF model with ``strict=True`` first, so a folder is only
    written for weights that fit the config exactly. On disk, transformers keeps its hub names (``out_proj``,
    ``fc1``, ``encoder.encoder``), as in the published D-FINE checkpoints.

    Args:
        model_state_dict: our state dict.
        cfg: our resolved config.
        folder: output directory (created if missing).
        config_settings: extra ``DFineConfig`` attributes, e.g. ``id2label`` / ``label2id`` (see
            ``dfine.hf.folder.label_settings``).

    Returns:
        The ``DFineConfig`` written to ``config.json``.
    """
    transformers = import_transformers()
    config = hf_config_from_dfine_config(cfg)
    for key, value in (config_settings or {}).items():
        setattr(config, key, value)
    model = transformers.DFineForObjectDetection(config)
    model.load_state_dict(dfine_to_hf_state_dict(model_state_dict, cfg), strict=True)
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    logger.info("wrote HuggingFace D-FINE weights and config to %s", folder)
    return config


def _safetensors_files(folder: Path) -> Iterator[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        yield from (folder / shard for shard in shards)
    elif (folder / "model.safetensors").is_file():
        yield folder / "model.safetensors"
    else:
        raise FileNotFoundError(
            f"{folder} has no model.safetensors (or model.safetensors.index.json); expected a folder written "
            "by save_hf_pretrained or DFineForObjectDetection.save_pretrained."
        )


def load_hf_pretrained(
    folder: str | Path, cfg: Mapping[str, Any] | None = None
) -> tuple[dict[str, Tensor], DFineConfig]:
    """Read a HuggingFace D-FINE folder (``config.json`` + safetensors) into our layout, offline.

    Args:
        folder: a folder written by :func:`save_hf_pretrained` or ``save_pretrained``.
        cfg: our config for the model the weights go into; it decides the ``anchors`` buffers
            (``eval_spatial_size``) and backbone step counters. Without it the folder's ``DFineConfig``
            decides (no anchors unless its ``anchor_image_size`` is set).

    Returns:
        ``(state_dict in our layout, DFineConfig)``.
    """
    transformers = import_transformers()
    from safetensors.torch import load_file

    folder = Path(folder)
    config = transformers.DFineConfig.from_pretrained(str(folder), local_files_only=True)
    tensors: dict[str, Tensor] = {}
    for file in _safetensors_files(folder):
        tensors.update(load_file(str(file)))
    return hf_to_dfine_state_dict(tensors, cfg if cfg is not None else config), config
