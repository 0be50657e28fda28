"""Data loaders from config blocks: per-rank batch sizes, samplers, config errors, epochs, reproducibility."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dfine.config.registry import ConfigError
from dfine.data import (
    DataLoader,
    ShardSampler,
    build_dataloader,
    check_dataloader_block,
    per_rank_batch_size,
)
from dfine.inference.show_batch import save_batch_pictures

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dataset"


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory) -> Path:
    """Ten 40 x 32 images with two boxes each, category ids 3 and 8."""
    root = tmp_path_factory.mktemp("tiny_coco")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index in range(10):
        name = f"{index}.png"
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": index + 1, "file_name": name, "width": 40, "height": 32})
        for k, (box, category) in enumerate([([2, 2, 10, 12], 3), ([20, 8, 16, 20], 8)]):
            annotations.append(
                {
                    "id": 2 * index + k + 1,
                    "image_id": index + 1,
                    "category_id": category,
                    "bbox": box,
                    "area": 1.0,
                }
            )
    categories = [{"id": 3, "name": "three"}, {"id": 8, "name": "eight"}]
    (root / "ann.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def _block(root: Path, **changes) -> dict:
    block = {
        "type": "DataLoader",
        "dataset": {
            "type": "CocoDetection",
            "img_folder": str(root),
            "ann_file": str(root / "ann.json"),
            "return_masks": False,
            "transforms": {
                "type": "Compose",
                "ops": [
                    {"type": "RandomZoomOut", "fill": 0},
                    {"type": "RandomIoUCrop", "p": 0.8},
                    {"type": "SanitizeBoundingBoxes", "min_size": 1},
                    {"type": "RandomHorizontalFlip"},
                    {"type": "Resize", "size": [64, 64]},
                    {"type": "SanitizeBoundingBoxes", "min_size": 1},
                    {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
                    {"type": "ConvertBoxes", "fmt": "cxcywh", "normalize": True},
                ],
                "policy": {"name": "stop_epoch", "epoch": 2, "ops": ["RandomZoomOut", "RandomIoUCrop"]},
            },
        },
        "shuffle": True,
        "num_workers": 0,
        "drop_last": True,
        "collate_fn": {
            "type": "BatchImageCollateFunction",
            "base_size": 64,
            "base_size_repeat": 2,
            "stop_epoch": 2,
            "ema_restart_decay": 0.9999,
        },
        "total_batch_size": 4,
    }
    block.update(changes)
    return block


def test_per_rank_batch_is_total_divided_by_world_size():
    assert per_rank_batch_size({"total_batch_size": 32}, world_size=4) == 8
    assert per_rank_batch_size({"batch_size": 6}, world_size=4) == 6
    with pytest.raises(
        ConfigError, match=r"total_batch_size 32 is not divisible by the number of processes 3"
    ):
        per_rank_batch_size({"total_batch_size": 32}, world_size=3, where="cfg.yml: train_dataloader")
    with pytest.raises(ConfigError, match="exactly one of total_batch_size"):
        per_rank_batch_size({"total_batch_size": 8, "batch_size": 8}, world_size=1)


def test_loader_yields_the_contract_batch_with_the_per_rank_batch_size(tiny_coco):
    loader = build_dataloader(
        _block(tiny_coco, total_batch_size=4), world_size=2, rank=1, seed=0, num_classes=2
    )
    assert isinstance(loader, DataLoader) and loader.batch_size == 2
    assert len(loader.sampler) == 5 and len(loader) == 2
    loader.set_epoch(0)
    images, targets = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape[:2] == (2, 3) and images.shape[-1] % 32 == 0
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    for target in targets:
        assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {0, 1}
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert bool(((target["boxes"] >= 0) & (target["boxes"] <= 1)).all())
        assert target["image_id"].dtype == torch.int64 and target["orig_size"].tolist() == [40, 32]
    assert loader.dataset.label_map.category_ids == [3, 8]


def test_validation_loader_shards_ranks_without_duplicates(tiny_coco):
    block = _block(tiny_coco, shuffle=False, drop_last=False, total_batch_size=3)
    seen = []
    for rank in range(3):
        loader = build_dataloader(block, split="val", world_size=3, rank=rank, num_classes=2)
        assert isinstance(loader.sampler, ShardSampler)
        seen += [int(t["image_id"]) for _, targets in loader for t in targets]
    assert sorted(seen) == list(range(1, 11))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("num_worker",),
            2,
            r"train_dataloader\.num_worker is not a data-loader setting\. Did you mean 'num_workers'",
        ),
        (
            ("dataset", "img_foldr"),
            "x",
            r"dataset\.img_foldr is not an argument of CocoDetection.*'img_folder'",
        ),
        (("dataset", "num_classes"), 3, "set once at the top level"),
        (("collate_fn", "base_sise"), 3, "Did you mean 'base_size'"),
        (("dataset", "type"), "CocoDetections", "Did you mean 'CocoDetection'"),
    ],
)
def test_a_misspelt_key_names_the_path_and_the_closest_valid_key(tiny_coco, path, value, message):
    block = copy.deepcopy(_block(tiny_coco))
    node = block
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        build_dataloader(block, where="cfg.yml: train_dataloader", num_classes=2)


def test_num_classes_smaller_than_the_annotation_file_is_an_error(tiny_coco):
    with pytest.raises(ConfigError, match=r"num_classes is 1 but .*ann\.json has 2 categories"):
        build_dataloader(_block(tiny_coco), num_classes=1)


@pytest.mark.parametrize("name", ["coco", "obj365", "custom", "quickstart"])
def test_dataset_configs_are_valid_loader_blocks(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yml").read_text())
    assert isinstance(config["num_classes"], int)
    for key in ("train_dataloader", "val_dataloader"):
        check_dataloader_block(config[key], where=f"{name}.yml: {key}")


def test_quickstart_config_builds_a_loader_of_320_pixel_batches(tmp_path):
    config = yaml.safe_load((CONFIGS / "quickstart.yml").read_text())
    block = copy.deepcopy(config["val_dataloader"])
    block["dataset"].update(root=str(tmp_path), num_images=4)
    block["num_workers"] = 0
    loader = build_dataloader(block, split="val", num_classes=config["num_classes"])
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 320, 320) and len(targets) == 4


def test_set_epoch_reaches_dataset_and_collate_in_persistent_workers(tiny_coco):
    """From stop_epoch on, zoom-out/crop and multi-scale are off even inside already-running workers."""
    block = _block(tiny_coco, num_workers=1, persistent_workers=True, total_batch_size=1)
    block["dataset"]["transforms"]["ops"] = [
        {"type": "RandomZoomOut", "fill": 0, "p": 1.0},
        {"type": "ConvertPILImage"},
    ]
    block["collate_fn"]["base_size_repeat"] = 0  # every multi-scale size differs from the input size
    loader = build_dataloader(block, seed=0, num_classes=2)
    loader.set_epoch(0)
    early = [tuple(images.shape[-2:]) for images, _ in loader]
    loader.set_epoch(2)
    late = [tuple(images.shape[-2:]) for images, _ in loader]
    assert all(shape != (32, 40) for shape in early)
    assert late == [(32, 40)] * 10


def _epoch_batches(loader: DataLoader, epoch: int) -> list[tuple[torch.Tensor, list]]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_is_the_same_whether_or_not_earlier_epochs_ran(tiny_coco, num_workers):
    """What exact resume needs: epoch 1 of a fresh loader equals epoch 1 after epoch 0."""
    block = _block(tiny_coco, num_workers=num_workers)
    torch.manual_seed(5)
    uninterrupted = build_dataloader(block, seed=7, num_classes=2)
    _epoch_batches(uninterrupted, 0)
    # Without workers the transforms draw from the main process's generators: a resume restores those.
    torch.manual_seed(9 if num_workers else 123)
    random.seed(11 if num_workers else 456)
    states = torch.get_rng_state(), random.getstate()
    expected = _epoch_batches(uninterrupted, 1)
    resumed = build_dataloader(block, seed=7, num_classes=2)
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    got = _epoch_batches(resumed, 1)
    assert len(got) == len(expected) == 2
    for (images_a, targets_a), (images_b, targets_b) in zip(expected, got, strict=True):
        torch.testing.assert_close(images_a, images_b)
        assert [int(t["image_id"]) for t in targets_a] == [int(t["image_id"]) for t in targets_b]
        for a, b in zip(targets_a, targets_b, strict=True):
            torch.testing.assert_close(a["boxes"], b["boxes"])
    other_seed = _epoch_batches(build_dataloader(block, seed=8, num_classes=2), 1)
    assert [int(t["image_id"]) for t in other_seed[0][1]] != [
        int(t["image_id"]) for t in expected[0][1]
    ] or not (torch.equal(other_seed[0][0], expected[0][0]))


def test_too_few_images_for_one_batch_is_an_error(tiny_coco):
    with pytest.raises(ConfigError, match="no full batch of 16"):
        build_dataloader(_block(tiny_coco, total_batch_size=16), num_classes=2)


def test_show_batch_writes_pictures_with_boxes(tiny_coco, tmp_path):
    loader = build_dataloader(_block(tiny_coco), num_classes=2)
    written = save_batch_pictures(loader, 2, tmp_path / "batches")
    assert [p.name for p in written] == ["batch_000.jpg", "batch_001.jpg"]
    assert Image.open(written[0]).size[0] > 64
