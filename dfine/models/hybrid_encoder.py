"""D-FINE's hybrid encoder: self-attention on the coarsest map(s), then top-down and bottom-up conv fusion.

Input projections bring every backbone level to ``hidden_dim`` channels. On the levels in ``use_encoder_idx``
a transformer encoder (AIFI: attention-based intra-scale feature interaction) mixes all positions of the map.
CCFF (cross-scale feature fusion) then runs a top-down pass (1x1 lateral conv, 2x nearest upsampling,
concatenation with the finer level, a RepNCSPELAN4 block) and a bottom-up pass (stride-2 SCDown,
concatenation, RepNCSPELAN4). Attribute names follow the original implementation so that its checkpoints load
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfine.config.registry import MODELS, ConfigError
from dfine.models.common import ConvNormLayer, get_activation
from dfine.models.fusion_blocks import RepNCSPELAN4, SCDown

__all__ = ["HybridEncoder", "TransformerEncoderLayer", "sincos_position_embedding"]


def sincos_position_embedding(height: int, width: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2D sine-cosine position embedding for a flattened [H, W] map.

    Args:
        height: rows H of the feature map.
        width: columns W of the feature map.
        dim: embedding size, a multiple of 4.
        temperature: base of the geometric frequency progression.

    Returns:
        [1, H * W, dim] float32: sin and cos of one coordinate in the first half of the channels, of the other
        coordinate in the second half.
    """
    if dim % 4 != 0:
        raise ValueError(f"the 2D sin-cos position embedding needs a dimension divisible by 4, got {dim}.")
    quarter = dim // 4
    inverse_frequency = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    # Token t of the row-major flattened map gets the coordinates (t // H, t % H), as in the original: for
    # square maps that is (row, column); for other shapes it is no clean grid, but trained weights expect it.
    first = torch.arange(int(width), dtype=torch.float32).repeat_interleave(int(height))
    second = torch.arange(int(height), dtype=torch.float32).repeat(int(width))
    first = first[:, None] * inverse_frequency[None]  # [H * W, dim / 4]
    second = second[:, None] * inverse_frequency[None]
    return torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)[None]


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; the position embedding is added to queries and keys only.

    Args:
        hidden_dim: token size C.
        nhead: attention heads (must divide ``hidden_dim``).
        dim_feedforward: hidden size of the feed-forward network.
        dropout: dropout on attention weights, feed-forward hidden and both residual branches.
        activation: feed-forward activation name.
    """

    def __init__(
        self, hidden_dim: int, nhead: int, dim_feedforward: int, dropout: float, activation: str
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)
        self.fused_attention = False  # see convert_to_deploy

    def convert_to_deploy(self) -> None:
        """Run the attention with the fused kernel (outputs move by ~1e-6).

        In PyTorch it saves the explicit softmax; in an INT8 OpenVINO graph the explicit form's transposed
        keys, quantised, went through a slow int8 transpose (0.21 ms of the quickstart model's ~8 ms).
        """
        self.fused_attention = True

    def forward(self, tokens: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        """[B, N, C] tokens (and [1 or B, N, C] position embedding) -> [B, N, C]."""
        query = tokens if pos_embed is None else tokens + pos_embed
        # need_weights=True takes the explicit-softmax path, bit-identical to the original; the fused kernel
        # differs by ~1e-6, enough to reorder near-tied scores in the decoder's top-k query selection, so
        # only the deployed model takes it.
        exact = not self.fused_attention
        attended = self.self_attn(query, query, value=tokens, need_weights=exact)[0]
        tokens = self.norm1(tokens + self.dropout1(attended))
        hidden = self.linear2(self.dropout(self.activation(self.linear1(tokens))))
        return self.norm2(tokens + self.dropout2(hidden))


class _TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` sharing one position embedding (key ``layers.{i}``)."""

    def __init__(self, num_layers: int, **layer_args) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(**layer_args) for _ in range(num_layers))

    def forward(self, tokens: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            tokens = layer(tokens, pos_embed)
        return tokens


@MODELS.register()
class HybridEncoder(nn.Module):
    """Intra-scale attention plus cross-scale fusion over the backbone's feature maps.

    Args:
        in_channels: channels of the backbone maps, finest first (must equal the backbone's ``out_channels``).
        feat_strides: their strides in pixels, finest first.
        hidden_dim: channels of every output map (and token size of the attention).
        nhead: attention heads.
        dim_feedforward: feed-forward hidden size of the attention layers.
        dropout: dropout of the attention layers.
        enc_act: feed-forward activation of the attention layers.
        use_encoder_idx: indices into ``in_channels`` of the levels that get self-attention (the coarsest in
            every D-FINE model).
        num_encoder_layers: attention layers per such level.
        pe_temperature: temperature of the sin-cos position embedding.
        expansion: width factor of the RepNCSPELAN4 branches: ``round(expansion * hidden_dim // 2)`` channels.
        depth_mult: depth factor: ``round(3 * depth_mult)`` RepVGG blocks per CSP layer.
        act: activation of the fusion blocks.
        eval_spatial_size: [H, W] of the images at evaluation; the position embedding for that size is
            precomputed. Other sizes get it computed on the fly.

    Raises:
        ValueError: inconsistent lengths or indices, or ``hidden_dim`` not divisible by 4 / ``nhead``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (512, 1024, 2048),
        feat_strides: Sequence[int] = (8, 16, 32),
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        use_encoder_idx: Sequence[int] = (2,),
        num_encoder_layers: int = 1,
        pe_temperature: float = 10000,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str = "silu",
        eval_spatial_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self._check_arguments(in_channels, feat_strides, hidden_dim, nhead, use_encoder_idx)
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size is not None else None
        self.out_channels = [hidden_dim] * len(self.in_channels)
        self.out_strides = list(self.feat_strides)

        self.input_proj = nn.ModuleList(ConvNormLayer(c, hidden_dim, 1) for c in self.in_channels)
        self.encoder = nn.ModuleList(
            _TransformerEncoder(
                num_encoder_layers,
                hidden_dim=hidden_dim,
                nhead=nhead,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                activation=enc_act,
            )
            for _ in self.use_encoder_idx
        )

        # The original computes this width with float floor division before rounding; kept for equal shapes.
        branch_channels = round(expansion * hidden_dim // 2)
        num_blocks = round(3 * depth_mult)
        num_merges = len(self.in_channels) - 1

        def fusion_block() -> RepNCSPELAN4:
            return RepNCSPELAN4(
                hidden_dim * 2, hidden_dim, hidden_dim * 2, branch_channels, num_blocks, act=act
            )

        self.lateral_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 1) for _ in range(num_merges)
        )
        self.fpn_blocks = nn.ModuleList(fusion_block() for _ in range(num_merges))
        # each SCDown sits in a one-element Sequential so that keys read downsample_convs.{i}.0.*
        self.downsample_convs = nn.ModuleList(
            nn.Sequential(SCDown(hidden_dim, hidden_dim, 3, 2)) for _ in range(num_merges)
        )
        self.pan_blocks = nn.ModuleList(fusion_block() for _ in range(num_merges))

        self._cached_grid: dict[int, tuple[int, int]] = {}
        if self.eval_spatial_size is not None:
            height, width = self.eval_spatial_size
            for level in self.use_encoder_idx:
                grid = (height // self.feat_strides[level], width // self.feat_strides[level])
                embedding = sincos_position_embedding(*grid, hidden_dim, pe_temperature)
                # not persistent: the original keeps it out of the state dict
                self.register_buffer(f"pos_embed{level}", embedding, persistent=False)
                self._cached_grid[level] = grid

    @staticmethod
    def _check_arguments(
        in_channels: Sequence[int],
        feat_strides: Sequence[int],
        hidden_dim: int,
        nhead: int,
        use_encoder_idx: Sequence[int],
    ) -> None:
        if len(in_channels) != len(feat_strides):
            raise ConfigError(
                f"HybridEncoder in_channels {list(in_channels)} and feat_strides {list(feat_strides)} must "
                "have one entry per backbone level."
            )
        if any(i not in range(len(in_channels)) for i in use_encoder_idx):
            raise ConfigError(
                f"HybridEncoder use_encoder_idx {list(use_encoder_idx)} must index in_channels "
                f"(0..{len(in_channels) - 1}); D-FINE uses the last level, [{len(in_channels) - 1}]."
            )
        if use_encoder_idx and (hidden_dim % 4 != 0 or hidden_dim % nhead != 0):
            raise ConfigError(
                f"HybridEncoder hidden_dim {hidden_dim} must be divisible by 4 (position embedding) and by "
                f"nhead {nhead}."
            )

    def _position_embedding(self, level: int, height: int, width: int, device: torch.device) -> Tensor:
        if self._cached_grid.get(level) == (height, width):
            return getattr(self, f"pos_embed{level}")
        return sincos_position_embedding(height, width, self.hidden_dim, self.pe_temperature).to(device)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Fuse backbone features.

        Args:
            feats: one [B, in_channels[i], H_i, W_i] map per level, finest first (H_i = H / feat_strides[i]).

        Returns:
            One [B, hidden_dim, H_i, W_i] map per level, finest first.
        """
        if len(feats) != len(self.in_channels):
            raise ValueError(
                f"HybridEncoder got {len(feats)} feature maps but was built for {len(self.in_channels)} "
                f"(in_channels {self.in_channels})."
            )
        projected = [proj(feat) for proj, feat in zip(self.input_proj, feats, strict=True)]

        for encoder, level in zip(self.encoder, self.use_encoder_idx, strict=True):
            batch, _, height, width = projected[level].shape
            tokens = projected[level].flatten(2).transpose(1, 2)  # [B, H * W, C]
            pos_embed = self._position_embedding(level, height, width, tokens.device)
            tokens = encoder(tokens, pos_embed)
            projected[level] = (
                tokens.transpose(1, 2).reshape(batch, self.hidden_dim, height, width).contiguous()
            )

        # top-down: each coarse map goes through its lateral conv, is upsampled and merged with the finer map
        laterals: list[Tensor] = [projected[0]] * len(projected)  # slot 0 is never read
        merged = projected[-1]
        for step, level in enumerate(range(len(projected) - 1, 0, -1)):
            laterals[level] = self.lateral_convs[step](merged)
            finer = projected[level - 1]
            # size= instead of scale_factor=2: the same result when sizes double, and odd sizes still work
            upsampled = F.interpolate(laterals[level], size=finer.shape[-2:], mode="nearest")
            merged = self.fpn_blocks[step](torch.cat([upsampled, finer], dim=1))

        # bottom-up: downsample the running output and merge it with the next coarser lateral map
        outputs = [merged]
        for level in range(len(projected) - 1):
            downsampled = self.downsample_convs[level](outputs[-1])
            outputs.append(self.pan_blocks[level](torch.cat([downsampled, laterals[level + 1]], dim=1)))
        return outputs

    def convert_to_deploy(self) -> None:
        """Merge RepVGG branches, fold every BatchNorm into its conv, fuse the attention kernel."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "convert_to_deploy"):
                module.convert_to_deploy()
