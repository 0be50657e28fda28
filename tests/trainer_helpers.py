"""A tiny trainable quickstart config shared by the trainer and CLI tests (seconds per epoch on one CPU core).

96-pixel images (multi-scale draws 64 or 96), HGNetv2-B0 with a 32-wide encoder/decoder, 2 decoder layers,
16 queries, 4 training images in batches of 2 (2 steps per epoch), 2 validation images, no workers. Also
the state-dict comparisons the engine tests share.
"""

from __future__ import annotations

from pathlib import Path

import torch

import dfine

SIZE = 96
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yml"
# The quickstart's D-FINE-N narrowed to a 32-wide encoder/decoder with 2 layers and 16 queries.
TINY_MODEL = [
    "model.encoder.hidden_dim=32",
    "model.encoder.dim_feedforward=64",
    "model.decoder.hidden_dim=32",
    "model.decoder.feat_channels=[32, 32]",
    "model.decoder.dim_feedforward=64",
    "model.decoder.num_layers=2",
    "model.decoder.num_queries=16",
    "model.decoder.num_denoising=10",
]


def tiny_overrides(
    output_dir: str | Path, data_root: str | Path, epochs: int = 2, stop_epoch: int = 100
) -> list[str]:
    """``key=value`` overrides (as for ``-u``) that turn configs/quickstart.yml into a seconds-long run."""
    return [
        f"output_dir={output_dir}",
        "seed=0",
        f"epochs={epochs}",
        f"train_dataloader.dataset.root={data_root}",
        f"val_dataloader.dataset.root={data_root}",
        "train_dataloader.dataset.num_images=4",
        "val_dataloader.dataset.num_images=2",
        "train_dataloader.total_batch_size=2",
        "val_dataloader.total_batch_size=2",
        "train_dataloader.num_workers=0",
        "val_dataloader.num_workers=0",
        f"eval_spatial_size=[{SIZE}, {SIZE}]",
        # A random flip keeps the data pipeline's RNG in play for the exact-resume tests.
        "train_dataloader.dataset.transforms.ops=[{type: RandomHorizontalFlip}, "
        f"{{type: Resize, size: [{SIZE}, {SIZE}]}}, {{type: ConvertPILImage, dtype: float32, scale: true}}, "
        "{type: ConvertBoxes, fmt: cxcywh, normalize: true}]",
        "train_dataloader.dataset.transforms.policy=null",
        f"train_dataloader.collate_fn.base_size={SIZE}",
        f"train_dataloader.collate_fn.stop_epoch={stop_epoch}",
        f"val_dataloader.dataset.transforms.ops=[{{type: Resize, size: [{SIZE}, {SIZE}]}}, "
        "{type: ConvertPILImage, dtype: float32, scale: true}]",
        *TINY_MODEL,
        "ema.warmups=2",
        "print_freq=1",
    ]


def tiny_config(
    output_dir: str | Path, data_root: str | Path, *extra: str, epochs: int = 2, stop_epoch: int = 100
) -> dfine.Config:
    """configs/quickstart.yml with :func:`tiny_overrides`, then ``extra`` overrides."""
    return dfine.load_config(CONFIG, [*tiny_overrides(output_dir, data_root, epochs, stop_epoch), *extra])


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict (weights change in place while training)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def differing_keys(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not exactly equal (both state dicts must have the same keys)."""
    assert first.keys() == second.keys(), "state dicts with different keys"
    return [key for key in first if not torch.equal(first[key], second[key])]
