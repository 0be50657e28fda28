"""Stage 2's epoch and EMA restart decay: every place the original configs use, and their disagreements."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from dfine.config import load_config
from dfine.config.registry import ConfigError
from dfine.config.stage_two import StageTwo, resolve_stage_two

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def stage_config(
    tmp_path: Path,
    stop_epoch: int | None = None,
    policy_epoch: int | None = None,
    restart_decay: float | None = None,
    old_restart_decay: float | None = None,
    milestones: list[int] | None = None,
) -> Path:
    """A config file setting only the given stage-2 keys, in the original D-FINE places."""
    collate: dict[str, Any] = {"type": "BatchImageCollateFunction"}
    if stop_epoch is not None:
        collate["stop_epoch"] = stop_epoch
    if old_restart_decay is not None:
        collate["ema_restart_decay"] = old_restart_decay
    transforms: dict[str, Any] = {"type": "Compose", "ops": [{"type": "RandomZoomOut"}]}
    if policy_epoch is not None:
        transforms["policy"] = {"name": "stop_epoch", "epoch": policy_epoch, "ops": ["RandomZoomOut"]}
    data: dict[str, Any] = {
        "train_dataloader": {
            "dataset": {"type": "QuickstartDetection", "transforms": transforms},
            "collate_fn": collate,
        },
        "ema": {"type": "ModelEMA", "decay": 0.9999},
    }
    if restart_decay is not None:
        data["ema"]["restart_decay"] = restart_decay
    if milestones is not None:
        data["lr_scheduler"] = {"type": "MultiStepLR", "milestones": milestones}
    path = tmp_path / "exp.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("places", "expected"),
    [
        ({"stop_epoch": 72}, 72),
        ({"policy_epoch": 72}, 72),
        ({"stop_epoch": 72, "policy_epoch": 72}, 72),
        ({}, None),
    ],
)
def test_the_stage_two_epoch_is_read_from_either_original_place(tmp_path, places, expected) -> None:
    assert resolve_stage_two(load_config(stage_config(tmp_path, **places))).epoch == expected


def test_disagreeing_stage_two_epochs_fail_at_load_naming_every_key_value_and_file(tmp_path) -> None:
    path = stage_config(tmp_path, stop_epoch=72, policy_epoch=120, milestones=[500])
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{path}: train_dataloader.collate_fn.stop_epoch = 72" in message
    assert f"{path}: train_dataloader.dataset.transforms.policy.epoch = 120" in message
    assert f"{path}: lr_scheduler.milestones = [500]" in message  # context only


def test_an_lr_milestone_at_another_epoch_than_stage_two_is_accepted(tmp_path) -> None:
    # The original D-FINE configs: milestones [500] (never reached) with stop_epoch 72.
    stage = resolve_stage_two(load_config(stage_config(tmp_path, stop_epoch=72, milestones=[500])))
    assert stage.epoch == 72
    assert resolve_stage_two(load_config(CONFIGS / "dfine" / "dfine_hgnetv2_l_coco.yml")).epoch == 72


def test_a_stage_two_epoch_that_is_not_an_epoch_number_is_rejected(tmp_path) -> None:
    path = stage_config(tmp_path)
    with pytest.raises(ConfigError, match=r"stop_epoch must be an epoch number >= 0, got 'late'"):
        load_config(path, ["train_dataloader.collate_fn.stop_epoch=late"])


def test_the_restart_decay_lives_in_the_ema_block(tmp_path) -> None:
    assert resolve_stage_two(load_config(stage_config(tmp_path, restart_decay=0.999))) == StageTwo(
        None, 0.999
    )


def test_the_old_restart_decay_place_is_used_with_a_note_on_its_new_home(tmp_path, caplog) -> None:
    cfg = load_config(stage_config(tmp_path, old_restart_decay=0.998))
    with caplog.at_level(logging.INFO, logger="dfine.config.stage_two"):
        assert resolve_stage_two(cfg).ema_restart_decay == 0.998
    assert "ema.restart_decay" in caplog.text and "collate_fn.ema_restart_decay" in caplog.text


def test_equal_restart_decays_in_both_places_are_accepted(tmp_path) -> None:
    cfg = load_config(stage_config(tmp_path, restart_decay=0.999, old_restart_decay=0.999))
    assert resolve_stage_two(cfg).ema_restart_decay == 0.999


def test_different_restart_decays_in_both_places_fail_at_load_naming_both(tmp_path) -> None:
    path = stage_config(tmp_path, restart_decay=0.999, old_restart_decay=0.99)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{path}: ema.restart_decay = 0.999" in message
    assert f"{path}: train_dataloader.collate_fn.ema_restart_decay = 0.99" in message


def test_a_restart_decay_outside_zero_to_one_is_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"ema\.restart_decay must be a decay in \[0, 1\), got 1\.5"):
        load_config(stage_config(tmp_path, restart_decay=1.5))


def test_a_plain_mapping_resolves_too() -> None:
    cfg = {"train_dataloader": {"collate_fn": {"stop_epoch": 3}}, "ema": {"restart_decay": 0.9}}
    assert resolve_stage_two(cfg) == StageTwo(epoch=3, ema_restart_decay=0.9)


def test_the_quickstart_keeps_its_stage_two_at_epoch_4_with_decay_099() -> None:
    assert resolve_stage_two(load_config(CONFIGS / "quickstart.yml")) == StageTwo(4, 0.99)


def test_the_note_on_the_old_restart_decay_place_comes_once_when_used_not_at_every_load(
    tmp_path, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="dfine.config.stage_two"):
        cfg = load_config(stage_config(tmp_path, old_restart_decay=0.998))
        assert "now belongs" not in caplog.text, "loading (dfine-eval, dfine-predict) must not repeat it"
        resolve_stage_two(cfg)
    assert caplog.text.count("now belongs") == 1


def test_deims_three_epoch_policy_gives_stage_two_at_its_last_epoch() -> None:
    cfg = {
        "train_dataloader": {
            "collate_fn": {"stop_epoch": 50},
            "dataset": {"transforms": {"policy": {"epoch": [4, 29, 50]}}},
        }
    }
    assert resolve_stage_two(cfg).epoch == 50
    cfg["train_dataloader"]["collate_fn"]["stop_epoch"] = 29  # the mosaic stop is no stage-2 epoch
    with pytest.raises(ConfigError, match="disagree"):
        resolve_stage_two(cfg)
