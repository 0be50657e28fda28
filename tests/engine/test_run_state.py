"""Run state and checkpoints on a tiny quickstart config (CPU): what a checkpoint holds, resume, -r auto.

The reference run trains 3 epochs with the stage-2 switch at epoch 1 and a checkpoint after every epoch;
the resume tests continue from those checkpoints in a fresh run and must land on bit-identical weights.
"""

from __future__ import annotations

import functools
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trainer_helpers
from trainer_helpers import clone_state, differing_keys

from dfine.config.registry import ConfigError
from dfine.engine.run_state import RunState, resume_or_refuse
from dfine.engine.setup import build_training
from dfine.engine.trainer import Trainer

EPOCHS = 3
STOP_EPOCH = 1

# The checkpoint layout (dfine-eval, -r, -t and the HF conversion read it): it must not change.
CHECKPOINT_KEYS = {
    "model",
    "ema",
    "optimizer",
    "lr_schedule",
    "scaler",
    "epoch",
    "last_epoch",
    "global_step",
    "stage",
    "best",
    "seed",
    "rng",
    "history",
    "label_map",
    "config",
}

tiny_config = functools.partial(trainer_helpers.tiny_config, epochs=EPOCHS)


def _scramble_global_rng() -> None:
    """A resumed run must not depend on the generators' state in the process that resumes it."""
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def test_run_state_round_trips_through_its_checkpoint_entries() -> None:
    state = RunState(seed=7, epoch=5, global_step=40, stage=2, best_ap=0.5, best_epoch=3, best_stage1_ap=0.4)
    state.history = [{"epoch": 0, "loss": 2.0}]
    entries = state.state_dict()
    assert entries == {
        "epoch": 5,
        "last_epoch": 4,
        "global_step": 40,
        "stage": 2,
        "best": {"ap": 0.5, "epoch": 3, "stage1_ap": 0.4},
        "seed": 7,
        "history": [{"epoch": 0, "loss": 2.0}],
    }
    loaded = RunState(seed=0)
    loaded.load_state_dict(entries)
    assert loaded == state
    # an early checkpoint without stage / best / seed keeps the defaults and the current seed
    older = RunState(seed=3)
    older.load_state_dict({"epoch": 2, "global_step": 8})
    assert (older.stage, older.best_ap, older.best_epoch, older.seed, older.history) == (1, -1.0, -1, 3, [])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Any]:
    """3 uninterrupted epochs (stage 2 from epoch 1), a checkpoint after each; final model and EMA weights."""
    output_dir = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(output_dir, data_root, "checkpoint_freq=1", stop_epoch=STOP_EPOCH)
    trainer = Trainer(build_training(cfg))
    trainer.fit()
    return {
        "output_dir": output_dir,
        "model": clone_state(trainer.run.model),
        "ema": clone_state(trainer.run.ema.module),
        "global_step": trainer.state.global_step,
        "history": trainer.state.history,
    }


def _copy_run_files(reference_dir: Path, output_dir: Path, checkpoint: str, as_name: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(reference_dir / "best_stage1.pth", output_dir / "best_stage1.pth")
    shutil.copy(reference_dir / checkpoint, output_dir / as_name)
    return output_dir / as_name


def test_reference_run_switches_to_stage_two_at_stop_epoch(reference_run: dict[str, Any]) -> None:
    stages = [record["stage"] for record in reference_run["history"]]
    assert stages == [1, 2, 2]
    assert reference_run["global_step"] == EPOCHS * 2
    for name in ("last.pth", "best.pth", "best_stage1.pth", "checkpoint0000.pth", "checkpoint0002.pth"):
        assert (reference_run["output_dir"] / name).is_file(), name


def test_a_saved_checkpoint_holds_exactly_the_documented_entries(reference_run: dict[str, Any]) -> None:
    checkpoint = torch.load(reference_run["output_dir"] / "last.pth", weights_only=True)
    assert set(checkpoint) == CHECKPOINT_KEYS
    assert (checkpoint["epoch"], checkpoint["last_epoch"], checkpoint["global_step"]) == (3, 2, 6)
    assert checkpoint["stage"] == 2 and set(checkpoint["best"]) == {"ap", "epoch", "stage1_ap"}
    assert set(checkpoint["ema"]) >= {"module", "updates"}
    assert [entry["name"] for entry in checkpoint["label_map"]] == ["circle", "square", "triangle", "star"]
    assert checkpoint["config"]["epochs"] == EPOCHS
    assert [r["epoch"] for r in checkpoint["history"]] == [0, 1, 2]


def test_only_an_enabled_rank_writes_checkpoints(data_root: Path, tmp_path: Path) -> None:
    run = build_training(tiny_config(tmp_path, data_root))
    run.checkpoints.enabled = False  # as on ranks other than 0
    run.checkpoints.save("last.pth")
    run.state.epoch_start_schedule = run.lr_schedule.state_dict()
    run.checkpoints.save_interrupted()
    assert not (tmp_path / "last.pth").exists()
    run.checkpoints.enabled = True
    run.checkpoints.save("last.pth")
    assert (tmp_path / "last.pth").is_file()


def test_resume_at_the_stage_two_switch_reproduces_the_uninterrupted_weights_bit_exactly(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    # checkpoint0000.pth: epoch 0 done, so the resumed run enters stage 2 in its first epoch.
    path = _copy_run_files(reference_run["output_dir"], tmp_path, "checkpoint0000.pth", "resume_from.pth")
    cfg = tiny_config(tmp_path, data_root, "checkpoint_freq=1", stop_epoch=STOP_EPOCH)
    _scramble_global_rng()
    trainer = Trainer(build_training(cfg, resume=str(path)))
    assert (trainer.state.epoch, trainer.state.stage) == (1, 1)
    trainer.fit()
    assert differing_keys(reference_run["model"], clone_state(trainer.run.model)) == []
    assert differing_keys(reference_run["ema"], clone_state(trainer.run.ema.module)) == []
    assert trainer.state.global_step == reference_run["global_step"]
    assert [r["stage"] for r in trainer.state.history] == [1, 2, 2]


def test_resume_auto_inside_stage_two_reproduces_the_uninterrupted_weights_bit_exactly(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    # A run that crashed after epoch 1 (already in stage 2) left checkpoint0001.pth as last.pth.
    _copy_run_files(reference_run["output_dir"], tmp_path, "checkpoint0001.pth", "last.pth")
    cfg = tiny_config(tmp_path, data_root, "checkpoint_freq=1", stop_epoch=STOP_EPOCH)
    _scramble_global_rng()
    trainer = Trainer(build_training(cfg, resume="auto"))
    assert (trainer.state.epoch, trainer.state.stage) == (2, 2), (
        "-r auto must pick up last.pth and stay in stage 2"
    )
    trainer.fit()
    assert differing_keys(reference_run["model"], clone_state(trainer.run.model)) == []
    assert differing_keys(reference_run["ema"], clone_state(trainer.run.ema.module)) == []


def test_a_two_epoch_run_extended_to_three_by_resume_equals_a_three_epoch_run(
    data_root: Path, tmp_path: Path
) -> None:
    # stop_epoch 2: the first run never reaches stage 2, the resumed one enters it in its first epoch.
    uninterrupted = Trainer(build_training(tiny_config(tmp_path / "full", data_root, stop_epoch=2)))
    uninterrupted.fit()
    first = Trainer(build_training(tiny_config(tmp_path / "split", data_root, epochs=2, stop_epoch=2)))
    first.fit()
    _scramble_global_rng()
    resumed = Trainer(
        build_training(
            tiny_config(tmp_path / "split", data_root, stop_epoch=2),
            resume=str(tmp_path / "split" / "last.pth"),
        )
    )
    resumed.fit()
    assert [r["stage"] for r in resumed.state.history] == [1, 1, 2]
    assert differing_keys(clone_state(uninterrupted.run.model), clone_state(resumed.run.model)) == []
    assert (
        differing_keys(clone_state(uninterrupted.run.ema.module), clone_state(resumed.run.ema.module)) == []
    )


def test_resume_auto_without_last_pth_starts_a_fresh_run(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(build_training(tiny_config(tmp_path, data_root), resume="auto"))
    assert (trainer.state.epoch, trainer.state.global_step, trainer.state.stage) == (0, 0, 1)
    assert (tmp_path / "config.yml").is_file()


def test_resume_from_a_weights_only_file_suggests_tune(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights.pth"
    torch.save({"model": reference_run["model"]}, weights)
    with pytest.raises(ConfigError, match=r"-t .*weights\.pth"):
        build_training(tiny_config(tmp_path, data_root), resume=str(weights))


def test_a_fresh_run_refuses_a_folder_with_checkpoints_unless_told(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert resume_or_refuse(tmp_path, None) is None  # empty folder: fresh
    (tmp_path / "best.pth").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"already holds a run.*-r auto.*--output-dir.*--exist-ok"):
        resume_or_refuse(tmp_path, None)
    assert resume_or_refuse(tmp_path, None, exist_ok=True) is None
    assert resume_or_refuse(tmp_path, "auto") == "auto"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted torchrun group continues its run
    assert resume_or_refuse(tmp_path, None) == "auto"
    assert resume_or_refuse(tmp_path, None, exist_ok=True) == "auto"


def test_resume_auto_falls_back_to_the_newest_loadable_checkpoint(tmp_path: Path, caplog) -> None:
    data_root = tmp_path / "data"
    run = build_training(trainer_helpers.tiny_config(tmp_path / "run", data_root))
    run.state.epoch, run.state.global_step = 1, 2
    run.checkpoints.save("best.pth")
    (tmp_path / "run" / "last.pth").write_bytes(b"\0" * 100)  # a damaged disk block
    resumed = build_training(trainer_helpers.tiny_config(tmp_path / "run", data_root), resume="auto")
    assert resumed.state.epoch == 1 and resumed.state.global_step == 2
    warning = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "unreadable" in r.message
    ]
    assert warning and "last.pth" in warning[0] and "best.pth" in warning[0], warning
