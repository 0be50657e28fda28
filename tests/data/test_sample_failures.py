"""A sample that fails to load mid-epoch is replaced and counted; past the threshold the run stops cleanly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader
from trainer_helpers import tiny_config

from dfine.cli.common import USER_ERRORS
from dfine.config.registry import ConfigError
from dfine.data import QuickstartDetection
from dfine.data.sample_failures import TooManyFailedSamplesError
from dfine.engine.setup import build_training
from dfine.engine.trainer import Trainer


def _dataset(data_root, fraction: float) -> QuickstartDetection:
    return QuickstartDetection(
        root=str(data_root), split="train", num_images=10, image_size=64, max_failed_fraction=fraction
    )


def _break(dataset: QuickstartDetection, *indices: int) -> list[str]:
    paths = [dataset.image_path(i) for i in indices]
    for path in paths:
        with open(path, "wb") as file:
            file.write(b"not a picture")
    return paths


def test_a_broken_file_is_replaced_counted_across_workers_and_named_once(tmp_path, caplog):
    dataset = _dataset(tmp_path, fraction=0.2)  # 2 of 10 allowed
    (broken,) = _break(dataset, 3)
    dataset.set_epoch(0)
    with caplog.at_level(logging.WARNING, logger="dfine.data"):
        items = list(DataLoader(dataset, batch_size=None, num_workers=2))
    ids = [int(target["image_id"]) for _, target in items]
    assert len(items) == 10 and ids[3] == int(dataset.table.image_ids[4])  # its neighbour took its place
    assert dataset.failed_samples == 1  # counted in a worker, read here
    dataset.set_epoch(1)
    assert dataset.failed_samples == 0  # per epoch
    items = [dataset[i] for i in range(10)]
    assert dataset.failed_samples == 1
    warnings = [r.getMessage() for r in caplog.records if broken in r.getMessage()]
    assert len(warnings) == 1 and "skipped a sample that failed to load" in warnings[0]


def test_more_failures_than_allowed_stop_with_one_readable_message(tmp_path):
    dataset = _dataset(tmp_path, fraction=0.2)
    _break(dataset, 1, 4, 7)
    dataset.set_epoch(0)
    with pytest.raises(TooManyFailedSamplesError) as caught:
        list(DataLoader(dataset, batch_size=None, num_workers=2))
    message = str(caught.value)
    assert message.startswith(
        "3 samples failed to load this epoch, more than max_failed_fraction allows (2 of 10)"
    )
    assert "Traceback" not in message and "--check-data" in message
    assert isinstance(caught.value, USER_ERRORS)  # the command line prints it without a traceback
    with pytest.raises(ConfigError, match=r"max_failed_fraction must be in 0\.\.1"):
        _dataset(tmp_path, fraction=1.5)


def test_training_reports_failures_per_epoch_and_stops_past_the_threshold_with_last_pth_intact(
    tmp_path, data_root
):
    cfg = tiny_config(
        tmp_path / "run", data_root, "train_dataloader.dataset.max_failed_fraction=0.3", epochs=3
    )
    trainer = Trainer(build_training(cfg))
    dataset = trainer.run.train_loader.dataset
    original = dataset.load_item

    def flaky(index):  # epoch 0: one unreadable file; epoch 1: the storage is gone
        if index == 0 or dataset.epoch >= 1:
            raise FileNotFoundError(f"image not found: {dataset.image_path(index)}")
        return original(index)

    dataset.load_item = flaky
    with pytest.raises(TooManyFailedSamplesError, match="samples failed to load this epoch"):
        trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0] and records[0]["failed_samples"] == 1
    last = torch.load(tmp_path / "run" / "last.pth", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1  # the finished epoch; nothing of the failed one was written over it
    assert "failed loads 1" in (tmp_path / "run" / "train.log").read_text()


def test_a_broken_mosaic_partner_is_replaced_and_counted(tmp_path):
    import random

    from dfine.data.mosaic import Mosaic

    dataset = _dataset(tmp_path, fraction=0.5)
    random.seed(0)
    partner = random.choices(range(len(dataset)), k=3)[0]  # the first partner Mosaic will draw
    _break(dataset, partner)
    dataset.set_epoch(0)
    image, target = dataset.load_item(0 if partner else 1)
    random.seed(0)
    out_image, _ = Mosaic(output_size=32, probability=1.0, use_cache=False)(image, target, dataset)
    assert out_image is not None
    assert dataset.failed_samples == 1  # the broken partner was replaced by its neighbour and counted
