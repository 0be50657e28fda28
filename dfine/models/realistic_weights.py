"""Helpers for tests and parity tools: deterministic "realistic" weights for any D-FINE-layout module.

Freshly initialised D-FINE models hide bugs: the last layers of the box heads, LQE, gates and attention
offsets start at zero, so every box equals its anchor, and default BatchNorm statistics make the encoder's
top-k scores tie to ~1e-7. :func:`realistic_state_dict` gives every tensor values drawn from a generator
seeded by the tensor's *key*, so the same weights can be rebuilt in any code base that shares the key names
(ours, the original D-FINE), and a parity fixture only has to store the seed, not megabytes of weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["KEEP_BUFFERS", "random_images", "realistic_state_dict", "state_dict_checksum"]

# Buffers whose values are defined by the architecture, not learnt: keep the module's own values.
KEEP_BUFFERS = ("anchors", "valid_mask", "num_points_scale", "num_batches_tracked", "up", "reg_scale")


def _generator(key: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _is_norm(key: str, shape: torch.Size, norm_prefixes: set[str]) -> bool:
    return len(shape) == 1 and key.rpartition(".")[0] in norm_prefixes


def realistic_state_dict(module: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """Deterministic, non-degenerate values for every parameter and BatchNorm statistic of ``module``.

    Weights get fan-in-scaled normal values, biases and 1-D parameters small normal values, norm scales ~1,
    running means ~0 and running variances in 0.5..1.5. Architecture buffers (:data:`KEEP_BUFFERS`) keep the
    module's own values.

    Returns:
        A state dict with the same keys, shapes and dtypes as ``module.state_dict()``.
    """
    norm_prefixes = {
        name
        for name, m in module.named_modules()
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
    }
    norm_prefixes |= {
        name for name, m in module.named_modules() if type(m).__name__.startswith("FrozenBatchNorm")
    }
    result: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        leaf = key.rpartition(".")[2]
        if leaf in KEEP_BUFFERS or not value.is_floating_point():
            result[key] = value.clone()
            continue
        gen = _generator(key, seed)
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
        if leaf == "running_var":
            new = 0.5 + torch.rand(value.shape, generator=gen)
        elif leaf == "running_mean":
            new = 0.1 * noise
        elif (_is_norm(key, value.shape, norm_prefixes) and leaf == "weight") or leaf == "scale":
            # norm scales and the learnable affine blocks' `scale` multiply activations: keep them near 1
            new = 1.0 + 0.1 * noise
        elif value.dim() >= 2:
            fan_in = math.prod(value.shape[1:])
            new = noise / math.sqrt(fan_in)
        else:
            new = 0.05 * noise
        result[key] = new.to(value.dtype)
    return result


def random_images(batch_size: int, height: int, width: int, seed: int = 0) -> Tensor:
    """[B, 3, H, W] float32 images in 0..1 from a seeded generator."""
    return torch.rand(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def state_dict_checksum(state_dict: dict[str, Tensor], keys: Iterable[str] | None = None) -> float:
    """A float summary of the values (checks that a regenerated state dict is the one a fixture used)."""
    total = 0.0
    for key in sorted(keys if keys is not None else state_dict):
        value = state_dict[key]
        # Architecture buffers are left out: the original stores reg_scale as int64 when the YAML says `4`.
        if value.is_floating_point() and key.rpartition(".")[2] not in KEEP_BUFFERS:
            total += float(value.double().abs().sum())
    return total
