"""DEIM's Dense O2O: Mosaic geometry and bookkeeping, batch MixUp in the collate function, the three-epoch
policy of Compose, seeded determinism, and (live, ``DEIM_DIR``) Mosaic and MixUp equal to DEIM's own."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from dfine.config.registry import ConfigError
from dfine.data.collate import BatchImageCollateFunction, mixup
from dfine.data.compose import Compose
from dfine.data.loader import build_dataloader
from dfine.data.mosaic import Mosaic

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def sample(index: int, width: int = 40, height: int = 30) -> tuple[Image.Image, dict[str, Any]]:
    """A grey image with one solid box of colour ``index`` at a known place, and its target."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    box = (5 + index, 4, 25 + index, 20)  # xyxy pixels
    image.paste(COLOURS[index % 4], box)
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                          canvas_size=(height, width)),
        "labels": torch.tensor([index]),
        "image_id": torch.tensor(100 + index),
        "orig_size": torch.tensor([width, height]),
    }  # fmt: skip
    return image, target


class FourImages:
    """The dataset interface Mosaic draws partners from."""

    def __len__(self) -> int:
        return 4

    def load_item(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        return sample(index)


def still_mosaic(**kwargs: Any) -> Mosaic:
    """Mosaic whose affine warp is the identity, so tile placement alone moves the boxes."""
    args = {"output_size": 30, "rotation_range": 0, "translation_range": (0, 0), "scaling_range": (1, 1),
            "fill_value": 0, "use_cache": False}  # fmt: skip
    return Mosaic(**{**args, **kwargs})


def test_mosaic_boxes_cover_the_pixels_of_their_image_in_each_tile() -> None:
    random.seed(0)
    image, target = still_mosaic()(*sample(0), FourImages())
    assert image.size == (80, 60)  # two 40 x 30 tiles each way
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.shape == (4, 4) and labels.shape == (4,)
    pixels = torch.as_tensor(np.array(image))  # [H, W, 3]
    for box, label in zip(boxes.round().long().tolist(), labels.tolist(), strict=True):
        x0, y0, x1, y1 = box
        inside = pixels[y0:y1, x0:x1].float()
        assert (inside == torch.tensor(COLOURS[label]).float()).all(), (box, label)
    # the first tile is the sample's own; its bookkeeping stays exact
    assert labels[0] == 0 and boxes[0].tolist() == [5, 4, 25, 20]
    assert target["image_id"] == 100 and target["orig_size"].tolist() == [40, 30]


def test_mosaic_warp_moves_boxes_with_the_pixels() -> None:
    torch.manual_seed(0)
    random.seed(0)
    mosaic = still_mosaic(translation_range=(0.2, 0.2))
    image, target = mosaic(*sample(1), FourImages())
    pixels = torch.as_tensor(np.array(image)).float()  # [H, W, 3]
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
        x0, y0, x1, y1 = (round(v) for v in box)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue  # pushed mostly off the canvas
        core = pixels[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]  # a pixel of margin for resampling at the edges
        assert (core == torch.tensor(COLOURS[label]).float()).all(), (box, label)


def test_mosaic_is_deterministic_under_a_seed_and_probability_zero_is_the_identity() -> None:
    def run() -> tuple[bytes, Tensor]:
        random.seed(3)
        torch.manual_seed(3)
        image, target = Mosaic(output_size=30, rotation_range=10, use_cache=False)(*sample(0), FourImages())
        return image.tobytes(), target["boxes"].clone()

    (a, boxes_a), (b, boxes_b) = run(), run()
    assert a == b and torch.equal(boxes_a, boxes_b)
    image, target = sample(2)
    assert Mosaic(probability=0.0)(image, target, FourImages()) == (image, target)


def batch(sizes: list[int]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    images = torch.stack([torch.full((3, 4, 4), float(i + 1)) for i in range(len(sizes))])
    targets = [
        {"boxes": torch.rand(n, 4), "labels": torch.full((n,), i), "image_id": torch.tensor(i),
         "orig_size": torch.tensor([8, 8])}
        for i, n in enumerate(sizes)
    ]  # fmt: skip
    return images, targets


def test_mixup_blends_each_image_with_the_previous_and_concatenates_its_boxes() -> None:
    images, targets = batch([2, 0, 3])
    mixed, mixed_targets = mixup(images, targets, 0.5)
    # image i = 0.5 * image i + 0.5 * image i-1 (image 0 with the last): constant images 1, 2, 3
    assert [m[0, 0, 0].item() for m in mixed] == [2.0, 1.5, 2.5]
    for i, target in enumerate(mixed_targets):
        partner = targets[i - 1]
        assert torch.equal(target["boxes"], torch.cat([targets[i]["boxes"], partner["boxes"]]))
        assert torch.equal(target["labels"], torch.cat([targets[i]["labels"], partner["labels"]]))
        assert target["image_id"] == i and torch.equal(target["orig_size"], targets[i]["orig_size"])
    assert [len(t["labels"]) for t in mixed_targets] == [5, 2, 3]
    assert "mixup" not in targets[0] and len(targets[0]["labels"]) == 2  # inputs untouched


def test_mixup_weights_are_w_for_own_boxes_and_one_minus_w_for_the_partners() -> None:
    images, targets = batch([1, 2])
    mixed, mixed_targets = mixup(images, targets, 0.47)
    torch.testing.assert_close(mixed[0], 0.47 * images[0] + 0.53 * images[1])
    assert mixed_targets[0]["mixup"].tolist() == pytest.approx([0.47, 0.53, 0.53])
    assert mixed_targets[1]["mixup"].tolist() == pytest.approx([0.47, 0.47, 0.53])
    own, partner = mixed_targets[0]["mixup"][0], mixed_targets[0]["mixup"][-1]
    assert (own + partner).item() == pytest.approx(1.0)  # as DEIM's beta and 1 - beta


def test_collate_mixes_only_inside_mixup_epochs_and_a_seed_repeats_the_batches() -> None:
    collate = BatchImageCollateFunction(base_size=32, mixup_prob=1.0, mixup_epochs=[2, 4])
    images, targets = batch([1, 1])
    items = list(zip(images, targets, strict=True))
    for epoch, mixed in [(1, False), (2, True), (3, True), (4, False)]:
        collate.set_epoch(epoch)
        _, out = collate(items)
        assert ("mixup" in out[0]) is mixed, epoch

    def seeded() -> Tensor:
        random.seed(7)
        return collate(items)[0]

    collate.set_epoch(2)
    first, second = seeded(), seeded()
    assert torch.equal(first, second)
    weight = (first[0, 0, 0, 0] - 2.0) / (1.0 - 2.0)  # images 1 and 2 blended
    assert 0.45 <= weight.item() <= 0.55


def test_collate_without_mixup_draws_no_random_numbers() -> None:
    collate = BatchImageCollateFunction(base_size=32)
    images, targets = batch([1, 1])
    random.seed(1)
    collate(list(zip(images, targets, strict=True)))
    assert random.random() == random.Random(1).random()  # the D-FINE recipe's sequence is unchanged


class Op:
    """A transform that records that it ran."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __call__(self, image: Any, target: Any, *dataset: Any) -> Any:
        self.log.append(type(self).__name__)
        return image, target


def named(name: str) -> type:
    return type(name, (Op,), {})


def deim_pipeline(mosaic_prob: float) -> tuple[Compose, list[str]]:
    log: list[str] = []
    names = ["Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "Resize"]
    ops = [named(name)(log) for name in names]
    policy = {"name": "stop_epoch", "epoch": [4, 29, 50], "ops": names[:4]}
    return Compose(ops, policy, mosaic_prob=mosaic_prob), log


@pytest.mark.parametrize(
    ("epoch", "mosaic_prob", "expected"),
    [
        (3, 1.0, ["Resize"]),  # warm-up stage: policy ops off
        (4, 1.0, ["Mosaic", "RandomPhotometricDistort", "Resize"]),  # mosaic stage, sample took Mosaic
        (28, 0.0, ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "Resize"]),  # it did not
        (29, 1.0, ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "Resize"]),  # no Mosaic
        (49, 1.0, ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "Resize"]),
        (50, 1.0, ["Resize"]),  # the no-aug stage
    ],
)
def test_three_epoch_policy_switches_ops_at_each_stage_boundary(
    epoch: int, mosaic_prob: float, expected: list[str]
) -> None:
    compose, log = deim_pipeline(mosaic_prob)
    compose("image", {"boxes": None}, dataset=None, epoch=epoch)
    assert log == expected


def test_mosaic_prob_sets_the_share_of_mosaic_samples() -> None:
    compose, log = deim_pipeline(0.5)
    random.seed(0)
    for _ in range(400):
        compose("image", {}, epoch=10)
    assert 160 < log.count("Mosaic") < 240
    assert log.count("Mosaic") + log.count("RandomZoomOut") == 400  # never both on one sample


def test_policy_epoch_must_be_an_int_or_three_increasing_epochs() -> None:
    with pytest.raises(ConfigError, match=r"three increasing epochs"):
        Compose([], {"name": "stop_epoch", "epoch": [29, 4, 50], "ops": []})
    with pytest.raises(ConfigError, match=r"\[start, stop\]"):
        BatchImageCollateFunction(mixup_prob=0.5, mixup_epochs="4")


def test_evaluation_loaders_refuse_mosaic_and_mixup(tmp_path: Path) -> None:
    dataset = {"type": "QuickstartDetection", "root": str(tmp_path), "split": "val", "num_images": 2}
    with pytest.raises(ConfigError, match=r"collate_fn\.mixup_prob"):
        build_dataloader({"dataset": dataset, "total_batch_size": 2, "collate_fn": {
            "type": "BatchImageCollateFunction", "mixup_prob": 0.5}}, split="val")  # fmt: skip
    mosaic = {**dataset, "transforms": {"type": "Compose", "ops": [{"type": "Mosaic"}]}}
    with pytest.raises(ConfigError, match="Mosaic is a training augmentation"):
        build_dataloader({"dataset": mosaic, "total_batch_size": 2}, split="val")


# ---------------------------------------------------------------------------------------- live DEIM
@pytest.mark.deim
def test_mosaic_equals_deims_mosaic_under_one_seed(deim: Path) -> None:
    from engine.data.transforms.mosaic import Mosaic as DeimMosaic

    args = {"output_size": 30, "rotation_range": 10, "translation_range": (0.1, 0.1),
            "scaling_range": (0.5, 1.5), "probability": 1.0, "fill_value": 0, "use_cache": False}  # fmt: skip
    results = []
    for mosaic in (Mosaic(**args), DeimMosaic(**args)):
        random.seed(5)
        torch.manual_seed(5)
        image, target = sample(0)
        out = mosaic(image, {k: target[k] for k in ("boxes", "labels")}, FourImages())
        results.append((out[0].tobytes(), out[1]["boxes"].as_subclass(Tensor), out[1]["labels"]))
    (ours_image, ours_boxes, ours_labels), (image, boxes, labels) = results
    assert ours_image == image
    torch.testing.assert_close(ours_boxes, boxes)
    assert torch.equal(ours_labels, labels)


@pytest.mark.deim
def test_collate_mixup_equals_deims_under_one_seed(deim: Path) -> None:
    from engine.data.dataloader import BatchImageCollateFunction as DeimCollate

    images, targets = batch([2, 1, 3])
    for target in targets:
        target["area"] = torch.rand(len(target["labels"]))
    items = list(zip(images, targets, strict=True))
    ours = BatchImageCollateFunction(base_size=32, mixup_prob=0.5, mixup_epochs=[0, 2])
    theirs = DeimCollate(base_size=32, mixup_prob=0.5, mixup_epochs=[0, 2])
    ours.set_epoch(1)
    theirs.set_epoch(1)
    for seed in range(6):  # some batches mixed, some not
        random.seed(seed)
        our_images, our_targets = ours(items)
        random.seed(seed)
        their_images, their_targets = theirs(items)
        torch.testing.assert_close(our_images, their_images)
        for mine, other in zip(our_targets, their_targets, strict=True):
            assert set(other) <= set(mine)
            for key in other:
                torch.testing.assert_close(mine[key], other[key])


def test_transforms_v2_affine_is_what_mosaic_uses() -> None:
    # Mosaic's warp is torchvision's RandomAffine (the same op DEIM uses), so its box maths is torchvision's
    assert isinstance(Mosaic().affine, T.RandomAffine)
