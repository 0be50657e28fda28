"""Our D-FINE against the original implementation: state-dict layout and outputs on the same weights.

The CI half reads tests/fixtures/model_parity_n.pt (made by tools/make_model_fixture.py from the original
code); the ``original`` half rebuilds the original model live when its checkout is available.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dfine
from dfine.testing import random_images, realistic_state_dict, state_dict_checksum

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "model_parity_n.pt"


def our_model(size: str, *overrides: str) -> torch.nn.Module:
    cfg = dfine.load_config(ROOT / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml", list(overrides))
    return dfine.build_model(cfg)


def original_model(orig_dir: Path, size: str, **kwargs: object) -> torch.nn.Module:
    if str(orig_dir) not in sys.path:
        sys.path.insert(0, str(orig_dir))
    from src.core import YAMLConfig

    path = orig_dir / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml"
    return YAMLConfig(str(path), HGNetv2={"pretrained": False}, **kwargs).model


def test_state_dict_layout_equals_the_original_n_checkpoint() -> None:
    fixture = torch.load(FIXTURE, weights_only=True)
    model = our_model("n", "eval_spatial_size=[320, 320]")
    state = model.state_dict()
    assert list(state) == fixture["keys"]
    assert [list(v.shape) for v in state.values()] == fixture["shapes"]


def test_eval_and_train_outputs_equal_the_original_n_on_recorded_weights() -> None:
    fixture = torch.load(FIXTURE, weights_only=True)
    model = our_model("n", "eval_spatial_size=[320, 320]", "model.decoder.num_denoising=0")
    weights = realistic_state_dict(model, fixture["seed"])
    assert state_dict_checksum(weights) == pytest.approx(fixture["checksum"], rel=1e-9)
    model.load_state_dict(weights, strict=True)
    images = random_images(1, *fixture["image_size"], seed=fixture["seed"])
    model.eval()
    with torch.no_grad():
        eval_out = model(images)
        model.train()
        train_out = model(
            images, [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
        )
    for key, expected in fixture["eval"].items():
        torch.testing.assert_close(eval_out[key], expected, atol=1e-4, rtol=0, msg=f"eval {key}")
    for key, expected in fixture["train"].items():
        torch.testing.assert_close(train_out[key], expected, atol=1e-4, rtol=0, msg=f"train {key}")


@pytest.mark.original
@pytest.mark.parametrize("size", ["n", "s", "m", "l", "x"])
def test_state_dict_keys_and_shapes_equal_the_original(original: Path, size: str) -> None:
    ours = our_model(size).state_dict()
    theirs = original_model(original, size).state_dict()
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for key in ("decoder.decoder.up", "decoder.decoder.reg_scale", "decoder.anchors", "decoder.valid_mask"):
        torch.testing.assert_close(ours[key], theirs[key], msg=key)


@pytest.mark.original
@pytest.mark.parametrize("size", ["n", "s"])
def test_eval_outputs_equal_the_original_live(original: Path, size: str) -> None:
    theirs = original_model(original, size, eval_spatial_size=[320, 256])
    ours = our_model(size, "eval_spatial_size=[320, 256]")
    weights = realistic_state_dict(theirs, seed=3)
    theirs.load_state_dict(weights, strict=True)
    ours.load_state_dict(weights, strict=True)
    images = random_images(2, 320, 256, seed=3)
    with torch.no_grad():
        expected = theirs.eval()(images)
        got = ours.eval()(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0, msg=key)
