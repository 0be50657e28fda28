"""The assembled D-FINE model: parameter counts, shapes, deploy form, builder checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dfine
from dfine.config.registry import ConfigError
from dfine.models.realistic_weights import random_images, realistic_state_dict

ROOT = Path(__file__).resolve().parents[2]

# Training-mode parameter counts of the original implementation with 80 classes (measured with the original
# D-FINE code, one size per process: its config loader leaks keys between configs loaded in one process).
ORIGINAL_PARAMETER_COUNTS = {
    "n": 3_782_693,
    "s": 10_321_877,
    "m": 19_590_064,
    "l": 31_244_152,
    "x": 62_621_560,
}

TINY = [
    "eval_spatial_size=[64, 96]",
    "num_classes=3",
    "model.encoder.hidden_dim=32",
    "model.encoder.dim_feedforward=64",
    "model.decoder.hidden_dim=32",
    "model.decoder.feat_channels=[32, 32]",
    "model.decoder.dim_feedforward=64",
    "model.decoder.num_layers=2",
    "model.decoder.num_queries=20",
    "model.decoder.num_denoising=10",
]


def config(size: str, *overrides: str) -> dfine.Config:
    return dfine.load_config(ROOT / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml", list(overrides))


@pytest.mark.parametrize("size", sorted(ORIGINAL_PARAMETER_COUNTS))
def test_parameter_count_equals_the_original(size: str) -> None:
    model = dfine.build_model(config(size))
    assert sum(p.numel() for p in model.parameters()) == ORIGINAL_PARAMETER_COUNTS[size]


@pytest.mark.parametrize("size", sorted(ORIGINAL_PARAMETER_COUNTS))
def test_every_size_runs_a_forward_pass_at_a_small_input(size: str) -> None:
    model = dfine.build_model(config(size, "eval_spatial_size=[128, 160]", "model.decoder.num_queries=30"))
    with torch.no_grad():
        out = model.eval()(random_images(1, 128, 160))
    assert out["pred_logits"].shape == (1, 30, 80)
    assert out["pred_boxes"].shape == (1, 30, 4)
    assert torch.isfinite(out["pred_boxes"]).all()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_output_shapes(batch_size: int) -> None:
    model = dfine.build_model(config("n", *TINY)).eval()
    with torch.no_grad():
        out = model(random_images(batch_size, 64, 96))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (batch_size, 20, 3)
    assert out["pred_boxes"].shape == (batch_size, 20, 4)


def test_training_output_has_everything_the_criterion_needs() -> None:
    model = dfine.build_model(config("n", *TINY)).train()
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    out = model(random_images(2, 64, 96), targets)
    for key in (
        "pred_logits",
        "pred_boxes",
        "pred_corners",
        "ref_points",
        "up",
        "reg_scale",
        "aux_outputs",
        "enc_aux_outputs",
        "pre_outputs",
        "dn_outputs",
        "dn_pre_outputs",
        "dn_meta",
    ):
        assert key in out, key
    assert len(out["aux_outputs"]) == 1  # num_layers - 1
    assert out["pred_corners"].shape == (2, 20, 4 * 33)


def test_deploy_output_equals_eval_output() -> None:
    model = dfine.build_model(config("n", *TINY))
    model.load_state_dict(realistic_state_dict(model, seed=1))
    images = random_images(2, 64, 96, seed=1)
    with torch.no_grad():
        expected = model.eval()(images)
        got = model.deploy()(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)


def test_encoder_channels_that_do_not_fit_the_backbone_are_reported() -> None:
    cfg = config("n", "model.encoder.in_channels=[256, 512]")
    with pytest.raises(ConfigError, match=r"set model\.encoder\.in_channels: \[512, 1024\]"):
        dfine.build_model(cfg)


def test_num_classes_inside_a_block_is_rejected_in_favour_of_the_top_level() -> None:
    with pytest.raises(ConfigError, match="set once at the top level"):  # now already when loading
        dfine.build_model(config("n", "model.decoder.num_classes=5"))
