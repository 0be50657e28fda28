"""The D-FINE decoder: query selection from the encoder output, then FDR refinement (DFINETransformer)."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dfine.config.registry import MODELS, ConfigError
from dfine.models.common import conv_with_bias_like, fold_norm_into_conv
from dfine.models.decoder_layers import MLP, DecoderHeads, DecoderLayer, FDRDecoder
from dfine.models.deformable_attention import SAMPLING_METHODS, value_levels_from_maps
from dfine.models.denoising import build_denoising_queries
from dfine.models.encoder_queries import QUERY_SELECT_METHODS, make_anchors, select_top_queries

__all__ = ["DFINETransformer"]

logger = logging.getLogger(__name__)

_PRIOR_LOGIT = -math.log((1 - 0.01) / 0.01)  # class logits start at a 1% prior probability
_ANCHOR_CACHE_SIZE = 16


@MODELS.register()
class DFINETransformer(nn.Module):
    """D-FINE decoder: picks the encoder's best cells as queries and refines their boxes layer by layer.

    State-dict keys equal the original's: ``input_proj.*``, ``up``, ``reg_scale``, ``anchors``,
    ``valid_mask``, ``decoder.*`` (with the shared ``decoder.up`` / ``decoder.reg_scale``),
    ``denoising_class_embed``, ``query_pos_head``, ``enc_*``, ``dec_score_head``, ``dec_bbox_head``,
    ``pre_bbox_head``.

    Args:
        num_classes: C.
        hidden_dim: query and feature width D.
        num_queries: Q matching queries.
        feat_channels: channels of each encoder feature map.
        feat_strides: stride of each encoder feature map; extra levels double the last stride.
        num_levels: feature levels attended (>= len(feat_channels); extra ones by stride-2 convs).
        num_points: deformable sampling points, one int or one per level.
        nhead: attention heads.
        num_layers: decoder layers.
        dim_feedforward: feed-forward width.
        dropout: dropout in the decoder layers.
        activation: feed-forward activation.
        num_denoising: denoising query budget in training (0 switches denoising off).
        label_noise_ratio: twice the label-flip probability of denoising queries.
        box_noise_scale: edge noise of denoising boxes, in half box sizes.
        learn_query_content: learn the query content instead of taking the selected encoder features.
        eval_spatial_size: (H, W) of eval images; anchors for it are precomputed buffers. Other input
            sizes work (anchors computed on the fly and cached), and a checkpoint saved with another eval size
            loads: its ``anchors`` / ``valid_mask`` are replaced by ours (see :meth:`set_eval_spatial_size`).
        eval_idx: the layer whose outputs eval returns (negative counts from the end).
        eps: anchors closer than this to the image border are invalid.
        aux_loss: add auxiliary, encoder, pre-decoder and denoising outputs in training.
        cross_attn_method: ``"default"`` (grid_sample) or ``"discrete"`` (gather; no GridSample needed).
        query_select_method: ``"default"``, ``"agnostic"`` (one objectness logit) or ``"one2many"``.
        reg_max: bins per box edge minus one.
        reg_scale: curvature of the weighting function W(n).
        layer_scale: width multiplier of layers after ``eval_idx``.
        mlp_act: activation of the box and position MLPs.
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: Sequence[int] = (512, 1024, 2048),
        feat_strides: Sequence[int] = (8, 16, 32),
        num_levels: int = 3,
        num_points: int | Sequence[int] = 4,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        learn_query_content: bool = False,
        eval_spatial_size: Sequence[int] | None = None,
        eval_idx: int = -1,
        eps: float = 1e-2,
        aux_loss: bool = True,
        cross_attn_method: str = "default",
        query_select_method: str = "default",
        reg_max: int = 32,
        reg_scale: float = 4.0,
        layer_scale: float = 1,
        mlp_act: str = "relu",
    ) -> None:
        super().__init__()
        _check_arguments(feat_channels, feat_strides, num_levels, num_layers, eval_idx, hidden_dim, nhead)
        if cross_attn_method not in SAMPLING_METHODS:
            raise ConfigError(f"cross_attn_method {cross_attn_method!r} is not one of {SAMPLING_METHODS}")
        if query_select_method not in QUERY_SELECT_METHODS:
            raise ConfigError(
                f"query_select_method {query_select_method!r} is not one of {QUERY_SELECT_METHODS}"
            )
        strides = list(feat_strides)
        strides += [strides[-1] * 2 ** (k + 1) for k in range(num_levels - len(strides))]
        self.feat_strides = tuple(strides)
        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_layers = num_layers
        self.eps = eps
        self.aux_loss = aux_loss
        self.reg_max = reg_max
        self.cross_attn_method = cross_attn_method
        self.query_select_method = query_select_method
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.learn_query_content = learn_query_content
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.deployed = False
        self._num_inputs = len(feat_channels)
        self._anchor_cache: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()

        self.input_proj = self._input_projections(tuple(feat_channels))
        # Constants of W(n), stored as frozen parameters so checkpoints carry them (original layout).
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)
        scaled_dim = round(layer_scale * hidden_dim)
        layer_args = {"n_head": nhead, "dropout": dropout, "activation": activation, "n_levels": num_levels}
        layer_args |= {"n_points": num_points, "cross_attn_method": cross_attn_method}
        self.decoder = FDRDecoder(
            DecoderLayer(hidden_dim, dim_feedforward=dim_feedforward, **layer_args),
            DecoderLayer(scaled_dim, dim_feedforward=round(layer_scale * dim_feedforward), **layer_args),
            num_layers,
            nhead,
            reg_max,
            self.up,
            self.reg_scale,
            eval_idx,
            layer_scale,
        )
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        if learn_query_content:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, act=mlp_act)
        self.enc_output = nn.Sequential(
            OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)), ("norm", nn.LayerNorm(hidden_dim))])
        )
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        num_narrow = self.eval_idx + 1
        widths = [hidden_dim] * num_narrow + [scaled_dim] * (num_layers - num_narrow)
        self.dec_score_head = nn.ModuleList(nn.Linear(width, num_classes) for width in widths)
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        self.dec_bbox_head = nn.ModuleList(
            MLP(width, width, 4 * (reg_max + 1), 3, act=mlp_act) for width in widths
        )

        self.eval_spatial_size: tuple[int, int] | None = None
        self._eval_shapes: list[tuple[int, int]] | None = None
        self.set_eval_spatial_size(eval_spatial_size)
        self._reset_parameters(tuple(feat_channels))

    # ----------------------------------------------------------------------------------------- construction
    def _input_projections(self, feat_channels: tuple[int, ...]) -> nn.ModuleList:
        """1x1 conv + BN per input level (identity if widths match); stride-2 3x3 conv + BN per extra one."""
        projections = nn.ModuleList()
        for channels in feat_channels:
            projections.append(self._conv_norm(channels, kernel_size=1, stride=1))
        channels = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            projections.append(self._conv_norm(channels, kernel_size=3, stride=2))
            channels = self.hidden_dim
        return projections

    def _conv_norm(self, in_channels: int, kernel_size: int, stride: int) -> nn.Module:
        if in_channels == self.hidden_dim:
            return nn.Identity()
        conv = nn.Conv2d(
            in_channels, self.hidden_dim, kernel_size, stride, padding=kernel_size // 2, bias=False
        )
        return nn.Sequential(OrderedDict([("conv", conv), ("norm", nn.BatchNorm2d(self.hidden_dim))]))

    def _reset_parameters(self, feat_channels: tuple[int, ...]) -> None:
        nn.init.constant_(self.enc_score_head.bias, _PRIOR_LOGIT)
        for head in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            nn.init.zeros_(head.layers[-1].weight)  # boxes start at their anchors / references
            nn.init.zeros_(head.layers[-1].bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, _PRIOR_LOGIT)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        if self.learn_query_content:
            nn.init.xavier_uniform_(self.tgt_embed.weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for projection, channels in zip(self.input_proj, feat_channels, strict=False):
            if channels != self.hidden_dim:
                nn.init.xavier_uniform_(projection.conv.weight)
        if self.num_denoising > 0:
            with torch.no_grad():  # the padding row stays zero
                nn.init.normal_(self.denoising_class_embed.weight[:-1])

    # -------------------------------------------------------------------------------------------- anchors
    def set_eval_spatial_size(self, eval_spatial_size: Sequence[int] | None) -> None:
        """Precompute the ``anchors`` / ``valid_mask`` buffers for (H, W) eval images (None removes them).

        Args:
            eval_spatial_size: (H, W) in pixels, or None.
        """
        if eval_spatial_size is not None:
            if len(eval_spatial_size) != 2:
                raise ValueError(f"eval_spatial_size must be (H, W), got {eval_spatial_size!r}")
            eval_spatial_size = (int(eval_spatial_size[0]), int(eval_spatial_size[1]))
        self.eval_spatial_size = eval_spatial_size
        if eval_spatial_size is None:
            self._eval_shapes = None
            self._buffers.pop("anchors", None)
            self._buffers.pop("valid_mask", None)
            return
        height, width = eval_spatial_size
        # Feature maps of an (H, W) image are (H / stride, W / stride), rounded down as in the original.
        self._eval_shapes = [(int(height / stride), int(width / stride)) for stride in self.feat_strides]
        anchors, valid_mask = make_anchors(self._eval_shapes, self.eps, device=self.up.device)
        self.register_buffer("anchors", anchors)  # [1, S, 4] inverse-sigmoid cxcywh, inf where invalid
        self.register_buffer("valid_mask", valid_mask)  # [1, S, 1] bool

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ) -> None:
        # Anchors follow from eval_spatial_size and the strides, so a checkpoint saved at another eval size
        # still loads: its anchors are replaced by ours (or dropped when we keep none).
        for name in ("anchors", "valid_mask"):
            key = prefix + name
            if key not in state_dict:
                continue
            ours = self._buffers.get(name)
            theirs = state_dict[key]
            if ours is None:
                state_dict.pop(key)
                logger.info("ignoring %s from the checkpoint: this model has no eval_spatial_size", key)
                continue
            # EMA averaging leaves rounding noise in float buffers: only a real difference is reported
            same = theirs.shape == ours.shape and torch.allclose(theirs.to(ours), ours, rtol=1e-4, atol=1e-6)
            if not same:
                logger.info(
                    "%s from the checkpoint (shape %s) does not match eval_spatial_size %s; "
                    "keeping the recomputed one (shape %s)",
                    key,
                    tuple(theirs.shape),
                    self.eval_spatial_size,
                    tuple(ours.shape),
                )
            state_dict[key] = ours
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _anchors_for(
        self, spatial_shapes: list[tuple[int, int]], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Anchors [1, S, 4] and valid mask [1, S, 1] for these feature shapes (buffers when they match)."""
        if spatial_shapes == self._eval_shapes:
            return self.anchors, self.valid_mask
        key = (tuple(spatial_shapes), device, torch.is_inference_mode_enabled())
        cached = self._anchor_cache.get(key)
        if cached is None:
            cached = make_anchors(spatial_shapes, self.eps, device=device)
            self._anchor_cache[key] = cached
            if len(self._anchor_cache) > _ANCHOR_CACHE_SIZE:
                self._anchor_cache.popitem(last=False)
        return cached

    # -------------------------------------------------------------------------------------------- forward
    def _flatten_features(
        self, feats: Sequence[Tensor]
    ) -> tuple[Tensor, list[tuple[int, int]], list[Tensor]]:
        """Project the levels to D channels and flatten them.

        Returns:
            ``(memory [B, S, D], [(H_l, W_l), ...], the projected maps [B, D, H_l, W_l])``.
        """
        if len(feats) != self._num_inputs:
            raise ValueError(f"expected {self._num_inputs} feature maps (feat_channels), got {len(feats)}")
        levels = [self.input_proj[index](feat) for index, feat in enumerate(feats)]
        for index in range(len(feats), self.num_levels):
            source = feats[-1] if index == len(feats) else levels[-1]
            levels.append(self.input_proj[index](source))
        spatial_shapes = [(level.shape[2], level.shape[3]) for level in levels]
        memory = torch.cat([level.flatten(2).transpose(1, 2) for level in levels], dim=1)  # [B, S, D]
        return memory, spatial_shapes, levels

    def _encoder_queries(
        self, memory: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Top-Q encoder cells as queries.

        Returns:
            ``(content [B, Q, D], reference box logits [B, Q, 4] (detached), encoder boxes [B, Q, 4] cxcywh,
            encoder logits [B, Q, C])``; the last two only in training (for the encoder loss).
        """
        anchors, valid_mask = self._anchors_for(spatial_shapes, memory.device)
        memory = valid_mask.to(memory.dtype) * memory
        enc_memory = self.enc_output(memory)  # [B, S, D]
        enc_logits = self.enc_score_head(enc_memory)  # [B, S, C] (or [B, S, 1] agnostic)
        top_memory, top_logits, top_anchors = select_top_queries(
            enc_memory,
            enc_logits,
            anchors,
            self.num_queries,
            self.query_select_method,
            gather_logits=self.training,
        )
        box_logits = self.enc_bbox_head(top_memory).float() + top_anchors  # [B, Q, 4] inverse-sigmoid cxcywh
        if self.learn_query_content:
            content = self.tgt_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        else:
            content = top_memory.detach()
        enc_boxes = torch.sigmoid(box_logits) if self.training else None
        return content, box_logits.detach(), enc_boxes, top_logits

    def forward(
        self, feats: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Any]:
        """Detect objects from the encoder's feature maps.

        Args:
            feats: per level [B, feat_channels[l], H_l, W_l].
            targets: training only (denoising): per image ``labels`` int64 [N], ``boxes`` [N, 4] cxcywh
                in 0..1.

        Returns:
            Eval: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] cxcywh in 0..1 (float32).
            Training, in this order: ``pred_logits``, ``pred_boxes``, ``pred_corners`` [B, Q, 4 * R],
            ``ref_points`` [B, Q, 4], ``up``, ``reg_scale``; with ``aux_loss`` also ``aux_outputs`` (one dict
            per earlier layer: pred_logits, pred_boxes, pred_corners, ref_points, teacher_corners,
            teacher_logits),
            ``enc_aux_outputs`` ([{pred_logits [B, Q, C or 1], pred_boxes}]), ``pre_outputs``, ``enc_meta``
            ({class_agnostic}) and, when denoising ran, ``dn_outputs`` (one dict per layer, as aux_outputs),
            ``dn_pre_outputs`` and ``dn_meta`` (see :class:`.denoising.DenoisingQueries`).
        """
        if self.training and self.deployed:
            raise RuntimeError(
                "DFINETransformer was converted with convert_to_deploy() and can only run in eval"
            )
        memory, spatial_shapes, maps = self._flatten_features(feats)
        if self.training and self.num_denoising > 0:
            denoising = build_denoising_queries(
                targets,
                self.num_classes,
                self.num_queries,
                self.denoising_class_embed,
                num_denoising=self.num_denoising,
                label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale,
            )
        else:
            denoising = None
        content, ref_unact, enc_boxes, enc_logits = self._encoder_queries(memory, spatial_shapes)
        if denoising is not None and denoising.content is not None:
            content = torch.cat((denoising.content, content), dim=1)
            ref_unact = torch.cat((denoising.boxes_unact, ref_unact), dim=1)
        heads = DecoderHeads(self.dec_bbox_head, self.dec_score_head, self.query_pos_head, self.pre_bbox_head)
        attn_mask = None if denoising is None else denoising.attn_mask
        decoded = self.decoder(
            content,
            ref_unact,
            memory,
            spatial_shapes,
            heads,
            attn_mask=attn_mask,
            value_levels=value_levels_from_maps(maps, self.nhead),
        )
        if not self.training:
            return {"pred_logits": decoded.logits[-1], "pred_boxes": decoded.boxes[-1]}
        dn_meta = None if denoising is None else denoising.dn_meta
        return _training_outputs(self, decoded, enc_logits, enc_boxes, dn_meta)

    def convert_to_deploy(self) -> None:
        """Eval fast path: fold input BatchNorms, drop unused layers and heads, compute W(n) once."""
        if self.deployed:
            return
        for index, projection in enumerate(self.input_proj):
            if isinstance(projection, nn.Sequential):
                weight, bias = fold_norm_into_conv(projection.conv, projection.norm)
                self.input_proj[index] = conv_with_bias_like(projection.conv, weight, bias)
        self.decoder.convert_to_deploy()
        keep = self.eval_idx
        self.dec_score_head = nn.ModuleList([nn.Identity()] * keep + [self.dec_score_head[keep]])
        self.dec_bbox_head = self.dec_bbox_head[: keep + 1]
        self.deployed = True


def _check_arguments(
    feat_channels, feat_strides, num_levels, num_layers, eval_idx, hidden_dim, nhead
) -> None:
    if len(feat_channels) > num_levels:
        raise ConfigError(f"feat_channels {list(feat_channels)} has more levels than num_levels={num_levels}")
    if len(feat_strides) != len(feat_channels):
        raise ConfigError(
            f"feat_strides {list(feat_strides)} must give one stride per entry of feat_channels "
            f"{list(feat_channels)}"
        )
    if not -num_layers <= eval_idx < num_layers:
        raise ConfigError(f"eval_idx {eval_idx} is outside the {num_layers} decoder layers")
    if hidden_dim % nhead:
        raise ConfigError(f"hidden_dim {hidden_dim} is not divisible by nhead {nhead}")


def _layer_dicts(
    logits: Tensor,
    boxes: Tensor,
    corners: Tensor,
    refs: Tensor,
    teacher_corners: Tensor,
    teacher_logits: Tensor,
) -> list[dict[str, Tensor]]:
    """One dict per layer [L, B, Q, ...]; the teacher (last layer's corners and logits) is shared by all."""
    return [
        {
            "pred_logits": layer_logits,
            "pred_boxes": layer_boxes,
            "pred_corners": layer_corners,
            "ref_points": layer_refs,
            "teacher_corners": teacher_corners,
            "teacher_logits": teacher_logits,
        }
        for layer_logits, layer_boxes, layer_corners, layer_refs in zip(
            logits, boxes, corners, refs, strict=True
        )
    ]


def _training_outputs(model: DFINETransformer, decoded, enc_logits, enc_boxes, dn_meta) -> dict[str, Any]:
    """Split denoising from matching queries and lay the outputs out as the original's training dict."""
    boxes, logits, corners, refs = decoded.boxes, decoded.logits, decoded.corners, decoded.refs
    pre_boxes, pre_logits = decoded.pre_boxes, decoded.pre_logits
    if dn_meta is not None:
        split = dn_meta["dn_num_split"]
        dn_pre_logits, pre_logits = torch.split(pre_logits, split, dim=1)
        dn_pre_boxes, pre_boxes = torch.split(pre_boxes, split, dim=1)
        dn_boxes, boxes = torch.split(boxes, split, dim=2)
        dn_logits, logits = torch.split(logits, split, dim=2)
        dn_corners, corners = torch.split(corners, split, dim=2)
        dn_refs, refs = torch.split(refs, split, dim=2)
    out: dict[str, Any] = {
        "pred_logits": logits[-1],
        "pred_boxes": boxes[-1],
        "pred_corners": corners[-1],
        "ref_points": refs[-1],
        "up": model.up,
        "reg_scale": model.reg_scale,
    }
    if not model.aux_loss:
        return out
    out["aux_outputs"] = _layer_dicts(
        logits[:-1], boxes[:-1], corners[:-1], refs[:-1], corners[-1], logits[-1]
    )
    out["enc_aux_outputs"] = [{"pred_logits": enc_logits, "pred_boxes": enc_boxes}]
    out["pre_outputs"] = {"pred_logits": pre_logits, "pred_boxes": pre_boxes}
    out["enc_meta"] = {"class_agnostic": model.query_select_method == "agnostic"}
    if dn_meta is not None:
        out["dn_outputs"] = _layer_dicts(
            dn_logits, dn_boxes, dn_corners, dn_refs, dn_corners[-1], dn_logits[-1]
        )
        out["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
        out["dn_meta"] = dn_meta
    return out
