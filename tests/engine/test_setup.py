"""Building a training run on the tiny quickstart config (CPU): -t fine-tuning and its class maps, freezing,
the AMP choice, one process without DDP, and the stage-2 settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import clone_state, differing_keys, tiny_config

import dfine
from dfine.checkpoint import extract_model_state, load_checkpoint
from dfine.config.registry import ConfigError
from dfine.engine.setup import build_training
from dfine.engine.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Any]:
    """A 1-epoch run (so its EMA differs from its model): the folder with best.pth, and the final weights."""
    output_dir = tmp_path_factory.mktemp("trained")
    trainer = Trainer(build_training(tiny_config(output_dir, data_root, epochs=1)))
    trainer.fit()
    return {"output_dir": output_dir, "model": clone_state(trainer.run.model)}


def test_one_process_trains_the_model_itself_with_every_setting_read(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, data_root, "patience=3", "eval_interval=2", "checkpoint_freq=5", stop_epoch=4)
    run = build_training(cfg)
    assert run.train_model is run.model and run.step.model is run.model, "no wrapper in one process"
    assert run.step.graph_anchors == [], "the DDP graph anchors are for several processes only"
    settings = (run.epochs, run.eval_interval, run.checkpoint_freq, run.print_freq, run.patience)
    assert settings == (2, 2, 5, 1, 3)
    assert run.stop_epoch == 4 and run.class_names == ["circle", "square", "triangle", "star"]
    assert run.ema is run.step.ema and run.optimizer is run.step.optimizer and run.state is run.step.state


def test_the_run_takes_stage_two_from_the_config_and_hands_the_epoch_to_a_collate_without_one(
    data_root: Path, tmp_path: Path
) -> None:
    run = build_training(tiny_config(tmp_path / "collate", data_root, "ema.restart_decay=0.9", stop_epoch=3))
    assert (run.stop_epoch, run.ema_restart_decay) == (3, 0.9)
    assert run.train_loader.collate_fn.stop_epoch == 3
    # Only the augmentation policy names the epoch: multi-scale must still stop there.
    policy_only = tiny_config(
        tmp_path / "policy",
        data_root,
        "train_dataloader.collate_fn.stop_epoch=null",
        "train_dataloader.dataset.transforms.policy="
        "{name: stop_epoch, epoch: 5, ops: [RandomHorizontalFlip]}",
    )
    run = build_training(policy_only)
    assert run.stop_epoch == 5
    assert run.train_loader.collate_fn.stop_epoch == 5


def test_resume_and_tune_together_are_refused(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        build_training(tiny_config(tmp_path, data_root), resume="auto", tune="weights.pth")


def test_tune_with_different_num_classes_loads_all_but_the_class_heads_and_trains(
    trained: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path, data_root, "num_classes=6", epochs=1)
    trainer = Trainer(build_training(cfg, tune=str(trained["output_dir"] / "best.pth")))
    # -t takes the EMA weights when the checkpoint has them (D-FINE's convention for published weights).
    source, _ = extract_model_state(load_checkpoint(trained["output_dir"] / "best.pth"))
    heads, loaded = [], []
    for key, value in trainer.run.model.state_dict().items():
        if value.shape != source[key].shape:
            heads.append(key)
            assert value.shape[0] in (6, 7), f"{key}: {tuple(value.shape)} is not a 6-class head"
        else:
            assert torch.equal(value, source[key]), f"{key} was not loaded from the checkpoint"
            loaded.append(key)
    assert heads, "no class head changed shape"
    assert all(re.search(r"score_head|denoising_class_embed", key) for key in heads), heads
    assert (trainer.state.epoch, trainer.state.global_step) == (0, 0), "-t must start a new run"
    trainer.fit()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.run.model.parameters())


def test_tune_class_map_by_name_keeps_the_class_head_rows_of_classes_the_checkpoint_names(
    trained: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    # The dataset's classes are circle, square, triangle, star; the checkpoint's (same head size) are ordered
    # differently and lack triangle, so its rows must be remapped, not copied in place.
    names = ["star", "circle", "boat", "square"]
    entries = [{"label": i, "category_id": 10 + i, "name": name} for i, name in enumerate(names)]
    weights = tmp_path / "weights.pth"
    torch.save({"model": trained["model"], "label_map": entries}, weights)
    run = build_training(tiny_config(tmp_path, data_root, "tune_class_map=by_name"), tune=str(weights))
    kept = {0: 1, 1: 3, 3: 0}  # circle, square, star -> their checkpoint rows
    heads = [k for k in trained["model"] if re.search(r"score_head|denoising_class_embed", k)]
    assert heads
    state = run.model.state_dict()
    for key in heads:
        source = trained["model"][key]
        for new, old in kept.items():
            torch.testing.assert_close(state[key][new], source[old], rtol=0, atol=0, msg=f"{key} row {new}")
        if key.endswith("weight") and "denoising" not in key:
            assert not torch.equal(state[key][2], source[2]), f"{key}: triangle row was copied from 'boat'"


def test_tune_class_map_by_name_needs_a_checkpoint_with_a_label_map(
    trained: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights.pth"
    torch.save({"model": trained["model"]}, weights)
    with pytest.raises(ConfigError, match="label_map"):
        build_training(tiny_config(tmp_path, data_root, "tune_class_map=by_name"), tune=str(weights))


def test_freeze_regexes_freeze_matching_parameters_which_then_stay_unchanged(
    data_root: Path, tmp_path: Path
) -> None:
    patterns = ["^backbone[.]stem[.]", "decoder[.]enc_output[.]"]
    cfg = tiny_config(tmp_path, data_root, f"freeze={patterns}", epochs=1)
    trainer = Trainer(build_training(cfg))
    model = trainer.run.model
    names = [name for name, _ in model.named_parameters()]
    expected = {n for n in names if any(re.search(p, n) for p in patterns)}
    built_frozen = {n for n, p in dfine.build_model(cfg).named_parameters() if not p.requires_grad}
    assert expected and set(trainer.run.frozen) == expected | built_frozen
    before = clone_state(model)
    trainer.fit()
    after = clone_state(model)
    changed = set(differing_keys(before, after))
    assert not changed & expected, f"frozen parameters changed: {sorted(changed & expected)[:5]}"
    assert changed - expected, "the unfrozen parameters must train"
    ema = clone_state(trainer.run.ema.module)
    assert all(torch.equal(ema[name], before[name]) for name in expected)
