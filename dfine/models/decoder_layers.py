"""Building blocks of the D-FINE decoder and the Fine-grained Distribution Refinement (FDR) loop.

:class:`FDRDecoder` runs the decoder layers. After each layer the box head predicts, for every edge of every
query, logits over ``R = reg_max + 1`` bins; they are *added* to the previous layer's logits, and the
expected offset (bins weighted by W(n), see :mod:`dfine.ops.fdr`) moves the edge of the query's initial box
(the one the first layer predicts). Box maths runs in float32 with autocast switched off, so half precision
cannot invert boxes.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfine.models.common import get_activation
from dfine.models.deformable_attention import MSDeformableAttention, split_value_levels
from dfine.models.denoising import inverse_sigmoid
from dfine.ops.fdr import distance_to_box, distribution_integral, weighting_function

__all__ = [
    "LQE",
    "MLP",
    "DecoderHeads",
    "DecoderLayer",
    "DecoderOutputs",
    "FDRDecoder",
    "Gate",
    "decode_corners",
]


class MLP(nn.Module):
    """``num_layers`` linear layers with an activation between them (none after the last).

    Args:
        input_dim: width of the [..., input_dim] input.
        hidden_dim: width of the hidden layers.
        output_dim: width of the [..., output_dim] output.
        num_layers: number of linear layers (>= 1).
        act: activation name (see :func:`dfine.models.common.get_activation`).
    """

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, act: str = "relu"
    ) -> None:
        super().__init__()
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(widths))
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        """[..., input_dim] -> [..., output_dim]."""
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == last else self.act(layer(x))
        return x


class Gate(nn.Module):
    """Sigmoid-gated sum of two inputs followed by LayerNorm (replaces the residual after cross-attention).

    Starts as ``norm(0.5 * x + 0.5 * update)``: zero weights and zero bias (sigmoid(0) = 0.5).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        self.norm = nn.LayerNorm(d_model)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: Tensor, update: Tensor) -> Tensor:
        """``x``, ``update``: [B, Q, d_model] -> [B, Q, d_model]."""
        gate_x, gate_update = torch.sigmoid(self.gate(torch.cat((x, update), dim=-1))).chunk(2, dim=-1)
        return self.norm(gate_x * x + gate_update * update)


class LQE(nn.Module):
    """Location Quality Estimator: raises or lowers class scores by how peaked the edge distributions are.

    Args:
        k: number of top bin probabilities per edge used as features (their mean is added as a fifth).
        hidden_dim: width of the scoring MLP.
        num_layers: depth of the scoring MLP.
        reg_max: R - 1 (bins per edge minus one).
    """

    def __init__(self, k: int, hidden_dim: int, num_layers: int, reg_max: int) -> None:
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores: Tensor, corners: Tensor) -> Tensor:
        """Adjust class logits.

        Args:
            scores: [B, Q, C] class logits.
            corners: [B, Q, 4 * R] edge-bin logits.

        Returns:
            [B, Q, C] logits plus one quality logit per query.
        """
        batch_size, num_queries, _ = corners.shape
        probs = F.softmax(corners.reshape(batch_size, num_queries, 4, self.reg_max + 1), dim=-1)
        top = probs.topk(self.k, dim=-1).values  # [B, Q, 4, k]
        stats = torch.cat((top, top.mean(dim=-1, keepdim=True)), dim=-1).reshape(batch_size, num_queries, -1)
        return scores + self.reg_conf(stats.to(scores.dtype))


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention with a gate -> feed-forward, each followed by LayerNorm.

    Args:
        d_model: query width.
        n_head: attention heads.
        dim_feedforward: hidden width of the feed-forward block.
        dropout: dropout after each block.
        activation: feed-forward activation name.
        n_levels: feature levels the cross-attention samples.
        n_points: sampling points per level (int or one per level).
        cross_attn_method: ``"default"`` or ``"discrete"`` (see :mod:`.deformable_attention`).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_head: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        n_levels: int = 4,
        n_points: int | Sequence[int] = 4,
        cross_attn_method: str = "default",
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, method=cross_attn_method)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)
        self.fused_attention = False  # see convert_to_deploy

    def convert_to_deploy(self) -> None:
        """Run the self-attention with the fused kernel in eval too and deploy the cross-attention.

        Outputs move by ~1e-6 (see :meth:`.MSDeformableAttention.convert_to_deploy`).
        """
        self.fused_attention = True
        self.cross_attn.convert_to_deploy()

    def forward(
        self,
        target: Tensor,
        reference_boxes: Tensor,
        value_levels: Sequence[Tensor],
        attn_mask: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """Refine the queries.

        Args:
            target: [B, Q, d_model] query content.
            reference_boxes: [B, Q, 4] cxcywh in 0..1, where the cross-attention samples.
            value_levels: per level [B * n_head, d_model / n_head, H_l, W_l] features.
            attn_mask: [Q, Q] bool, True = blocked (denoising groups), or None.
            query_pos: [B, Q, d_model] positional embedding of the reference boxes, or None.

        Returns:
            [B, Q, d_model] refined queries.
        """
        with_pos = target if query_pos is None else target + query_pos
        # Eval keeps the explicit-softmax kernel the original runs (bit-identical outputs). Training and the
        # deployed model take the fused kernel (~1e-6 apart): with the 2 * max_boxes * groups denoising
        # queries the explicit softmax, its backward and the head-averaged weights were a quarter of a
        # D-FINE-N step on a CPU, and in the deployed D-FINE-N at 640 the explicit form cost ~3 of ~65 ms.
        exact = not (self.training or self.fused_attention)
        attended, _ = self.self_attn(
            with_pos, with_pos, value=target, attn_mask=attn_mask, need_weights=exact
        )
        target = self.norm1(target + self.dropout1(attended))
        with_pos = target if query_pos is None else target + query_pos
        sampled = self.cross_attn(with_pos, reference_boxes, value_levels)
        target = self.gateway(target, self.dropout2(sampled))
        update = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        # The clamp keeps fp16 activations finite before the last norm.
        return self.norm3((target + self.dropout4(update)).clamp(min=-65504, max=65504))


def decode_corners(reference_boxes: Tensor, corners: Tensor, project: Tensor, reg_scale: Tensor) -> Tensor:
    """Boxes from edge-bin logits, in float32 even inside an autocast region.

    Args:
        reference_boxes: [..., 4] initial boxes, cxcywh in 0..1.
        corners: [..., 4 * R] edge-bin logits (left, top, right, bottom).
        project: [R] bin values W(n).
        reg_scale: [1] curvature of W(n).

    Returns:
        [..., 4] float32 boxes, cxcywh in 0..1.
    """
    with torch.autocast(device_type=corners.device.type, enabled=False):
        distance = distribution_integral(corners.float(), project.float())
        return distance_to_box(reference_boxes.float(), distance, reg_scale.float())


class DecoderHeads(NamedTuple):
    """Prediction heads :class:`FDRDecoder` calls; ``DFINETransformer`` owns them (state-dict keys)."""

    bbox: nn.ModuleList  # per layer: MLP -> [B, Q, 4 * R]
    score: nn.ModuleList  # per layer: Linear -> [B, Q, C]
    query_pos: nn.Module  # MLP: [B, Q, 4] cxcywh -> [B, Q, hidden_dim]
    pre_bbox: nn.Module  # MLP: refines the initial reference box, [B, Q, 4] logits


class DecoderOutputs(NamedTuple):
    """Per-layer outputs, stacked over the L' layers kept (all in training, ``eval_idx`` alone in eval)."""

    boxes: Tensor  # [L', B, Q, 4] cxcywh, float32
    logits: Tensor  # [L', B, Q, C]
    corners: Tensor  # [L', B, Q, 4 * R], float32
    refs: Tensor  # [L', B, Q, 4] initial boxes the corners refer to, cxcywh
    pre_boxes: Tensor  # [B, Q, 4] first layer's initial boxes
    pre_logits: Tensor | None  # [B, Q, C] first layer's class logits (training only)


class FDRDecoder(nn.Module):
    """Stack of decoder layers with FDR box refinement.

    Args:
        layer: template for layers ``0..eval_idx`` (deep-copied, so all start equal).
        wide_layer: template for layers after ``eval_idx`` (width scaled by ``layer_scale``).
        num_layers: total layers.
        num_head: attention heads (to split the features per head).
        reg_max: R - 1.
        up, reg_scale: the parent's [1] parameters of W(n); shared, so they appear under both prefixes.
        eval_idx: index of the layer whose outputs are used in eval (negative counts from the end).
        layer_scale: width multiplier of the layers after ``eval_idx``.
    """

    def __init__(
        self,
        layer: DecoderLayer,
        wide_layer: DecoderLayer,
        num_layers: int,
        num_head: int,
        reg_max: int,
        up: nn.Parameter,
        reg_scale: nn.Parameter,
        eval_idx: int = -1,
        layer_scale: float = 1,
    ) -> None:
        super().__init__()
        self.up = up
        self.reg_scale = reg_scale
        self.num_layers = num_layers
        self.num_head = num_head
        self.reg_max = reg_max
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.layer_scale = layer_scale
        self.layers = nn.ModuleList(
            [copy.deepcopy(layer) for _ in range(self.eval_idx + 1)]
            + [copy.deepcopy(wide_layer) for _ in range(num_layers - self.eval_idx - 1)]
        )
        self.lqe_layers = nn.ModuleList(LQE(4, 64, 2, reg_max) for _ in range(num_layers))
        self.deployed = False

    def convert_to_deploy(self) -> None:
        """Keep only what eval uses: layers up to ``eval_idx``, its LQE, and W(n) computed once."""
        if self.deployed:
            return
        self.register_buffer(
            "project", weighting_function(self.reg_max, self.up, self.reg_scale).detach(), False
        )
        self.layers = self.layers[: self.eval_idx + 1]
        self.lqe_layers = nn.ModuleList([nn.Identity()] * self.eval_idx + [self.lqe_layers[self.eval_idx]])
        self.deployed = True

    def forward(
        self,
        target: Tensor,
        ref_points_unact: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        heads: DecoderHeads,
        attn_mask: Tensor | None = None,
        value_levels: Sequence[Tensor] | None = None,
    ) -> DecoderOutputs:
        """Run the layers.

        Args:
            target: [B, Q, D] initial query content.
            ref_points_unact: [B, Q, 4] inverse-sigmoid of the initial reference boxes (cxcywh).
            memory: [B, S, D] flattened features of all levels.
            spatial_shapes: (H_l, W_l) per level.
            heads: prediction heads.
            attn_mask: [Q, Q] bool self-attention mask (denoising) or None.
            value_levels: ``memory`` as per-head maps, [B * num_head, D / num_head, H_l, W_l] per level (see
                :func:`.deformable_attention.value_levels_from_maps`); split from ``memory`` when None.

        Returns:
            :class:`DecoderOutputs`.
        """
        project = self.project if self.deployed else weighting_function(self.reg_max, self.up, self.reg_scale)
        if value_levels is None:
            value_levels = split_value_levels(memory, spatial_shapes, self.num_head)
        output, output_detach, previous_corners = target, 0, 0
        ref_boxes = torch.sigmoid(ref_points_unact.float())  # [B, Q, 4] detached reference of each layer
        boxes, logits, corners_list, refs = [], [], [], []
        for index, layer in enumerate(self.layers):
            query_pos = heads.query_pos(ref_boxes.to(output.dtype)).clamp(min=-10, max=10)
            if index > self.eval_idx and self.layer_scale > 1:
                # Wider auxiliary layers: widen positions, features and queries by nearest interpolation.
                query_pos = F.interpolate(query_pos, scale_factor=self.layer_scale)
                wide_memory = F.interpolate(memory, size=query_pos.shape[-1])
                value_levels = split_value_levels(wide_memory, spatial_shapes, self.num_head)
                output = F.interpolate(output, size=query_pos.shape[-1])
                output_detach = output.detach()
            output = layer(output, ref_boxes, value_levels, attn_mask, query_pos)
            if index == 0:
                pre_boxes = self._initial_boxes(heads.pre_bbox(output), ref_boxes)
                pre_logits = heads.score[0](output) if self.training else None
                initial_boxes = pre_boxes.detach()
            # Bin logits accumulate over layers: each layer predicts a residual on the previous distribution.
            corners = heads.bbox[index](output + output_detach).float() + previous_corners  # [B, Q, 4 * R]
            layer_boxes = decode_corners(initial_boxes, corners, project, self.reg_scale)
            if self.training or index == self.eval_idx:
                logits.append(self.lqe_layers[index](heads.score[index](output), corners))
                boxes.append(layer_boxes)
                corners_list.append(corners)
                refs.append(initial_boxes)
                if not self.training:
                    break
            previous_corners = corners
            ref_boxes = layer_boxes.detach()
            output_detach = output.detach()
        return DecoderOutputs(
            torch.stack(boxes),
            torch.stack(logits),
            torch.stack(corners_list),
            torch.stack(refs),
            pre_boxes,
            pre_logits,
        )

    @staticmethod
    def _initial_boxes(pre_bbox_logits: Tensor, ref_boxes: Tensor) -> Tensor:
        """[B, Q, 4] cxcywh float32: ``ref_boxes`` moved by the pre-box head's logit offsets."""
        with torch.autocast(device_type=ref_boxes.device.type, enabled=False):
            return torch.sigmoid(pre_bbox_logits.float() + inverse_sigmoid(ref_boxes.float()))
