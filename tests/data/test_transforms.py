"""Transforms keep boxes on their pixels; the stop-epoch policy; multi-scale batches; letterbox; Mosaic."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors

from dfine.config.registry import TRANSFORMS, ConfigError
from dfine.data import (
    BatchImageCollateFunction,
    Compose,
    build_transforms,
    multi_scale_sizes,
    original_frame_size,
)
from dfine.data.base import finalize_sample
from dfine.data.mosaic import Mosaic

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
BOXES = [[4.0, 6.0, 24.0, 16.0], [30.0, 20.0, 60.0, 45.0], [10.0, 30.0, 22.0, 44.0]]  # xyxy, 64 x 48 image

# The training pipeline of the original configs/dfine/include/dataloader.yml, verbatim.
ORIGINAL_TRAIN_TRANSFORMS = """
type: Compose
ops:
  - {type: RandomPhotometricDistort, p: 0.5}
  - {type: RandomZoomOut, fill: 0}
  - {type: RandomIoUCrop, p: 0.8}
  - {type: SanitizeBoundingBoxes, min_size: 1}
  - {type: RandomHorizontalFlip}
  - {type: Resize, size: [640, 640], }
  - {type: SanitizeBoundingBoxes, min_size: 1}
  - {type: ConvertPILImage, dtype: 'float32', scale: True}
  - {type: ConvertBoxes, fmt: 'cxcywh', normalize: True}
policy:
  name: stop_epoch
  epoch: 72 # epoch in [71, ~) stop `ops`
  ops: ['RandomPhotometricDistort', 'RandomZoomOut', 'RandomIoUCrop']
"""


def _sample(width: int = 64, height: int = 48) -> tuple[Image.Image, dict]:
    """Black image with one solid colour rectangle per box (colour i = box i)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for (x1, y1, x2, y2), colour in zip(BOXES, COLOURS, strict=True):
        pixels[int(y1) : int(y2), int(x1) : int(x2)] = colour
    boxes = tv_tensors.BoundingBoxes(torch.tensor(BOXES), format="XYXY", canvas_size=(height, width))
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "image_id": torch.tensor(1)}
    return Image.fromarray(pixels), target


def _assert_boxes_on_their_pixels(image: Image.Image, target: dict, tolerance: float = 1.0) -> None:
    """Each output box must be the extent of its colour's pixels in the output image."""
    pixels = np.asarray(image)
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
        mask = (pixels == COLOURS[label]).all(axis=2)
        ys, xs = np.nonzero(mask)
        assert len(xs), f"box {box} of label {label} has no pixels of its colour"
        extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        np.testing.assert_allclose(box, extent, atol=tolerance, err_msg=f"label {label}")


def _build(block: dict):
    return TRANSFORMS.build(block)


@pytest.mark.parametrize(
    "block",
    [
        {"type": "RandomHorizontalFlip", "p": 1.0},
        {"type": "RandomZoomOut", "fill": 0, "p": 1.0},
        {"type": "Resize", "size": [96, 80], "interpolation": "nearest"},
        {"type": "Resize", "size": [40, 40], "interpolation": "nearest", "keep_ratio": True},
        {"type": "RandomCrop", "size": [40, 52]},
    ],
    ids=["flip", "zoom-out", "resize", "letterbox", "crop"],
)
def test_geometric_transform_keeps_boxes_on_their_pixels(block):
    torch.manual_seed(0)
    for _ in range(5):
        image, target = _build(block)(*_sample())
        _assert_boxes_on_their_pixels(image, target, tolerance=1.0 if block["type"] != "Resize" else 1.5)


def test_iou_crop_then_sanitize_keeps_boxes_on_their_pixels():
    torch.manual_seed(0)
    crop, sanitize = _build({"type": "RandomIoUCrop", "p": 1.0}), _build({"type": "SanitizeBoundingBoxes"})
    cropped = 0
    for _ in range(30):
        image, target = sanitize(*crop(*_sample()))
        cropped += image.size != (64, 48)
        _assert_boxes_on_their_pixels(image, target)
    assert cropped > 5, "RandomIoUCrop(p=1) should crop most of the time"


def test_iou_crop_search_draws_crops_like_torchvision():
    """The batched search keeps torchvision's distribution (share left whole, crop size, boxes kept)."""
    import torchvision.transforms.v2 as T

    def stats(transform) -> list[float]:
        torch.manual_seed(0)
        whole, widths, kept = 0, [], []
        for _ in range(500):
            image, target = transform(*_sample())
            whole += image.size == (64, 48)
            if image.size != (64, 48):
                widths.append(image.size[0] / 64)
                kept.append(float((target["boxes"][:, 2] > target["boxes"][:, 0]).float().mean()))
        return [whole / 500, float(np.mean(widths)), float(np.mean(kept))]

    ours = stats(_build({"type": "RandomIoUCrop", "p": 1.0}))
    reference = stats(T.RandomIoUCrop())
    np.testing.assert_allclose(ours, reference, atol=0.06)


def test_iou_crop_with_p_zero_never_crops():
    crop = _build({"type": "RandomIoUCrop", "p": 0.0})
    assert all(crop(*_sample())[0].size == (64, 48) for _ in range(10))


def test_sanitize_drops_degenerate_and_tiny_boxes_with_their_labels():
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor(
            [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0], [3.0, 3.0, 3.5, 8.0], [9.0, 9.0, 2.0, 2.0]]
        ),
        format="XYXY",
        canvas_size=(16, 16),
    )
    target = {"boxes": boxes, "labels": torch.tensor([7, 8, 9, 10])}
    _, out = _build({"type": "SanitizeBoundingBoxes", "min_size": 1})(Image.new("RGB", (16, 16)), target)
    assert out["labels"].tolist() == [7]
    assert out["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]]


def test_letterbox_records_the_frame_that_maps_boxes_back_to_original_pixels():
    image, target = _sample(64, 32)
    target["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[8.0, 4.0, 40.0, 28.0]]), format="XYXY", canvas_size=(32, 64)
    )
    target["labels"], target["orig_size"] = torch.tensor([0]), torch.tensor([64, 32])
    out_image, out = Compose([_build({"type": "Resize", "size": [48, 48], "keep_ratio": True})])(
        image, target
    )
    assert out_image.size == (48, 48)
    torch.testing.assert_close(out["letterbox_size"], torch.tensor([64.0, 64.0]))
    _, final = finalize_sample(out_image, out)
    cx, cy, w, h = (final["boxes"][0] * original_frame_size(final).repeat(2)).tolist()
    np.testing.assert_allclose([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], [8, 4, 40, 28], atol=1e-4)


def test_final_sample_is_float_image_and_normalised_cxcywh_boxes():
    ops = [
        {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
        {"type": "ConvertBoxes", "fmt": "cxcywh", "normalize": True},
    ]
    image, target = finalize_sample(*build_transforms({"type": "Compose", "ops": ops})(*_sample()))
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64) and float(image.max()) == 1.0
    torch.testing.assert_close(target["boxes"][0], torch.tensor([14 / 64, 11 / 48, 20 / 64, 10 / 48]))
    # A pipeline without ConvertBoxes (the original's validation configs) gives the same contract.
    image2, target2 = finalize_sample(*Compose()(*_sample()))
    torch.testing.assert_close(image2, image)
    torch.testing.assert_close(target2["boxes"], target["boxes"])


def test_stop_epoch_policy_turns_the_listed_ops_off_from_its_epoch():
    compose = build_transforms(
        {
            "type": "Compose",
            "ops": [{"type": "RandomHorizontalFlip", "p": 1.0}, {"type": "Resize", "size": [48, 64]}],
            "policy": {"name": "stop_epoch", "epoch": 3, "ops": ["RandomHorizontalFlip"]},
        }
    )
    assert compose.active(2) == [True, True] and compose.active(3) == [False, True]
    flipped = [[64 - x2, y1, 64 - x1, y2] for x1, y1, x2, y2 in BOXES]
    assert compose(*_sample(), epoch=-1)[1]["boxes"].tolist() == flipped
    assert compose(*_sample(), epoch=2)[1]["boxes"].tolist() == flipped
    assert compose(*_sample(), epoch=3)[1]["boxes"].tolist() == BOXES
    compose.set_epoch(50)
    assert compose(*_sample())[1]["boxes"].tolist() == BOXES


def test_original_config_transform_block_loads_unchanged():
    compose = build_transforms(yaml.safe_load(ORIGINAL_TRAIN_TRANSFORMS))
    assert compose.op_names[:3] == ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]
    assert compose.active(71) == [True] * 9 and compose.active(72) == [False] * 3 + [True] * 6
    torch.manual_seed(0)
    image, target = finalize_sample(*compose(*_sample(), epoch=0))
    assert image.shape == (3, 640, 640) and target["boxes"].shape[1] == 4
    assert bool(((target["boxes"] >= 0) & (target["boxes"] <= 1)).all())


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"type": "RandomZoomOut", "fil": 0}, "Did you mean 'fill'"),
        ({"type": "RandomIouCrop"}, "Did you mean 'RandomIoUCrop'"),
    ],
)
def test_a_misspelt_transform_is_an_error_with_a_suggestion(block, message):
    with pytest.raises(ConfigError, match=message):
        build_transforms(
            {"type": "Compose", "ops": [block]}, where="cfg.yml: train_dataloader.dataset.transforms"
        )


def test_a_misspelt_policy_op_is_an_error():
    block = yaml.safe_load(ORIGINAL_TRAIN_TRANSFORMS)
    block["policy"]["ops"] = ["RandomIOUCrop"]
    with pytest.raises(ConfigError, match=r"policy\.ops: 'RandomIOUCrop'.*Did you mean 'RandomIoUCrop'"):
        build_transforms(block)


def test_multi_scale_sizes_are_the_original_table_and_multiples_of_32():
    assert multi_scale_sizes(640, 3) == [480, 512, 544, 576, 608, 640, 640, 640, 800, 768, 736, 704, 672]
    for base, repeat in [(320, 3), (640, 1), (960, 4)]:
        sizes = multi_scale_sizes(base, repeat)
        assert all(size % 32 == 0 for size in sizes) and sizes.count(base) >= repeat
    with pytest.raises(ValueError, match="multiple of 32"):
        multi_scale_sizes(500, 3)


def test_multi_scale_batches_vary_until_stop_epoch_then_keep_the_input_size():
    collate = BatchImageCollateFunction(
        base_size=320, base_size_repeat=3, stop_epoch=4, ema_restart_decay=0.999
    )
    items = [(torch.rand(3, 8, 8), {"labels": torch.tensor([0])}) for _ in range(2)]
    random.seed(0)
    collate.set_epoch(3)
    sizes = {collate(items)[0].shape[-1] for _ in range(60)}
    assert len(sizes) > 3 and sizes <= set(multi_scale_sizes(320, 3))
    collate.set_epoch(4)
    assert {collate(items)[0].shape[-1] for _ in range(20)} == {8}
    assert BatchImageCollateFunction(base_size_repeat=None).multi_scale_active(0) is False


def test_collate_stacks_images_and_keeps_targets_and_rejects_mixed_sizes():
    collate = BatchImageCollateFunction()
    images, targets = collate([(torch.zeros(3, 8, 8), {"id": 1}), (torch.ones(3, 8, 8), {"id": 2})])
    assert images.shape == (2, 3, 8, 8) and [t["id"] for t in targets] == [1, 2]
    with pytest.raises(ValueError, match="end the transforms with a Resize"):
        collate([(torch.zeros(3, 8, 8), {}), (torch.zeros(3, 8, 9), {})])


class _TinyDataset:
    def __len__(self) -> int:
        return 4

    def load_item(self, index: int):
        return _sample()


def test_mosaic_tiles_four_samples_with_boxes_on_their_pixels():
    random.seed(0)
    torch.manual_seed(0)
    mosaic = _build(
        {
            "type": "Mosaic",
            "output_size": 48,
            "rotation_range": 0,
            "translation_range": [0, 0],
            "scaling_range": [1, 1],
            "fill_value": 0,
            "use_cache": False,
        }
    )
    assert isinstance(mosaic, Mosaic)
    image, target = Compose([mosaic])(*_sample(), dataset=_TinyDataset())
    assert image.size == (128, 96) and len(target["labels"]) == 12
    pixels = np.asarray(image)
    for quadrant in range(4):
        dx, dy = 64 * (quadrant % 2), 48 * (quadrant // 2)
        sub = {
            "boxes": target["boxes"][3 * quadrant : 3 * quadrant + 3] - torch.tensor([dx, dy, dx, dy]),
            "labels": target["labels"][3 * quadrant : 3 * quadrant + 3],
        }
        _assert_boxes_on_their_pixels(Image.fromarray(pixels[dy : dy + 48, dx : dx + 64]), sub)


def test_mosaic_from_cache_needs_no_dataset_and_keeps_the_first_image_id():
    random.seed(1)
    mosaic = Mosaic(output_size=32, use_cache=True, max_cached_images=3)
    for _ in range(5):
        _, target = mosaic(*_sample())
    assert len(mosaic._cache) == 3 and target["image_id"].item() == 1
    assert len(target["labels"]) == target["boxes"].shape[0]


def test_validation_pipeline_runs_on_a_bare_image_for_prediction():
    val = build_transforms(
        {
            "type": "Compose",
            "ops": [
                {"type": "Resize", "size": [32, 32], "keep_ratio": True, "fill": 114},
                {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
            ],
        }
    )
    image, _ = _sample(64, 32)
    tensor = val(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 20:, :], torch.full((3, 12, 32), 114 / 255))


@pytest.mark.parametrize(
    "block",
    [
        {"type": "Resize", "size": [32, 32], "keep_ratio": True, "max_size": 64},
        {"type": "ConvertBoxes", "fmt": "xywhn"},
        {"type": "ConvertPILImage", "dtype": "float16"},
    ],
)
def test_invalid_transform_arguments_are_config_errors(block):
    with pytest.raises(ConfigError, match=block["type"]):
        build_transforms({"type": "Compose", "ops": [block]})
