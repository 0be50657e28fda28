"""The training engine on a tiny quickstart config (CPU): exact resume, -r auto, -t, non-finite losses,
gradient clipping and freezing.

The reference run trains 3 epochs with the stage-2 switch at epoch 1 and a checkpoint after every epoch;
the resume tests continue from those checkpoints in a fresh `Trainer` and must land on bit-identical weights.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trainer_helpers

import dfine
from dfine.checkpoint import extract_model_state, load_checkpoint
from dfine.config.registry import ConfigError
from dfine.engine import trainer as trainer_module
from dfine.engine.health import zero_ap_warning
from dfine.engine.trainer import NonFiniteLossError, Trainer

EPOCHS = 3
STOP_EPOCH = 1


tiny_config = functools.partial(trainer_helpers.tiny_config, epochs=EPOCHS)


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _differing_keys(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    assert first.keys() == second.keys(), "state dicts with different keys"
    return [key for key in first if not torch.equal(first[key], second[key])]


def _scramble_global_rng() -> None:
    """A resumed run must not depend on the generators' state in the process that resumes it."""
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Any]:
    """3 uninterrupted epochs (stage 2 from epoch 1), a checkpoint after each; final model and EMA weights."""
    output_dir = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(output_dir, data_root, "checkpoint_freq=1", stop_epoch=STOP_EPOCH)
    trainer = Trainer(cfg)
    trainer.fit()
    return {
        "output_dir": output_dir,
        "model": _clone_state(trainer.model),
        "ema": _clone_state(trainer.ema.module),
        "global_step": trainer.global_step,
        "history": trainer.history,
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


def test_resume_at_the_stage_two_switch_reproduces_the_uninterrupted_weights_bit_exactly(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    # checkpoint0000.pth: epoch 0 done, so the resumed run enters stage 2 in its first epoch.
    path = _copy_run_files(reference_run["output_dir"], tmp_path, "checkpoint0000.pth", "resume_from.pth")
    cfg = tiny_config(tmp_path, data_root, "checkpoint_freq=1", stop_epoch=STOP_EPOCH)
    _scramble_global_rng()
    trainer = Trainer(cfg, resume=str(path))
    assert (trainer.epoch, trainer.stage) == (1, 1)
    trainer.fit()
    assert _differing_keys(reference_run["model"], _clone_state(trainer.model)) == []
    assert _differing_keys(reference_run["ema"], _clone_state(trainer.ema.module)) == []
    assert trainer.global_step == reference_run["global_step"]
    assert [r["stage"] for r in trainer.history] == [1, 2, 2]


def test_resume_auto_inside_stage_two_reproduces_the_uninterrupted_weights_bit_exactly(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    # A run that crashed after epoch 1 (already in stage 2) left checkpoint0001.pth as last.pth.
    _copy_run_files(reference_run["output_dir"], tmp_path, "checkpoint0001.pth", "last.pth")
    cfg = tiny_config(tmp_path, data_root, "checkpoint_freq=1", stop_epoch=STOP_EPOCH)
    _scramble_global_rng()
    trainer = Trainer(cfg, resume="auto")
    assert (trainer.epoch, trainer.stage) == (2, 2), "-r auto must pick up last.pth and stay in stage 2"
    trainer.fit()
    assert _differing_keys(reference_run["model"], _clone_state(trainer.model)) == []
    assert _differing_keys(reference_run["ema"], _clone_state(trainer.ema.module)) == []


def test_a_two_epoch_run_extended_to_three_by_resume_equals_a_three_epoch_run(
    data_root: Path, tmp_path: Path
) -> None:
    # stop_epoch 2: the first run never reaches stage 2, the resumed one enters it in its first epoch.
    uninterrupted = Trainer(tiny_config(tmp_path / "full", data_root, stop_epoch=2))
    uninterrupted.fit()
    first = Trainer(tiny_config(tmp_path / "split", data_root, epochs=2, stop_epoch=2))
    first.fit()
    _scramble_global_rng()
    resumed = Trainer(
        tiny_config(tmp_path / "split", data_root, stop_epoch=2), resume=str(tmp_path / "split" / "last.pth")
    )
    resumed.fit()
    assert [r["stage"] for r in resumed.history] == [1, 1, 2]
    assert _differing_keys(_clone_state(uninterrupted.model), _clone_state(resumed.model)) == []
    assert _differing_keys(_clone_state(uninterrupted.ema.module), _clone_state(resumed.ema.module)) == []


def test_resume_auto_without_last_pth_starts_a_fresh_run(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, data_root), resume="auto")
    assert (trainer.epoch, trainer.global_step, trainer.stage) == (0, 0, 1)
    assert (tmp_path / "config.yml").is_file()


def test_resume_from_a_weights_only_file_suggests_tune(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights.pth"
    torch.save({"model": reference_run["model"]}, weights)
    with pytest.raises(ConfigError, match=r"-t .*weights\.pth"):
        Trainer(tiny_config(tmp_path, data_root), resume=str(weights))


def test_tune_with_different_num_classes_loads_all_but_the_class_heads_and_trains(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path, data_root, "num_classes=6", epochs=1)
    trainer = Trainer(cfg, tune=str(reference_run["output_dir"] / "best.pth"))
    # -t takes the EMA weights when the checkpoint has them (D-FINE's convention for published weights).
    source, _ = extract_model_state(load_checkpoint(reference_run["output_dir"] / "best.pth"))
    heads, loaded = [], []
    for key, value in trainer.model.state_dict().items():
        if value.shape != source[key].shape:
            heads.append(key)
            assert value.shape[0] in (6, 7), f"{key}: {tuple(value.shape)} is not a 6-class head"
        else:
            assert torch.equal(value, source[key]), f"{key} was not loaded from the checkpoint"
            loaded.append(key)
    assert heads, "no class head changed shape"
    assert all(re.search(r"score_head|denoising_class_embed", key) for key in heads), heads
    assert (trainer.epoch, trainer.global_step) == (0, 0), "-t must start a new run"
    trainer.fit()
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _nan_once(trainer: Trainer, term: str, times: int) -> list[int]:
    """Make the criterion return NaN for ``term`` on its next ``times`` calls; returns a call counter."""
    forward = trainer.criterion.forward
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        losses = forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] <= times:
            losses[term] = losses[term] * float("nan")
        return losses

    trainer.criterion.forward = patched
    return calls


def test_a_non_finite_loss_skips_the_step_with_a_warning_naming_the_term(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = Trainer(tiny_config(tmp_path, data_root, epochs=1))
    before = _clone_state(trainer.model)
    _nan_once(trainer, "loss_giou", times=1)
    with caplog.at_level(logging.WARNING, logger="dfine.engine.trainer"):
        stats = trainer.train_one_epoch(0)
    assert trainer.global_step == 1, "the NaN step must be skipped, the other one taken"
    assert any("loss_giou" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert np.isfinite(stats["loss"])
    after = _clone_state(trainer.model)
    assert all(torch.isfinite(value).all() for value in after.values() if value.is_floating_point())
    assert _differing_keys(before, after), "the finite step must still update the model"


def test_repeated_non_finite_losses_stop_the_run_and_keep_last_pth_loadable(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_module, "MAX_NON_FINITE_STEPS", 2)
    trainer = Trainer(tiny_config(tmp_path, data_root, epochs=2))
    trainer.epochs = 1
    trainer.fit()
    good = _clone_state(trainer.model)
    trainer.epochs = 2
    _nan_once(trainer, "loss_bbox", times=10**6)
    with pytest.raises(NonFiniteLossError, match=r"loss_bbox.*last\.pth"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "last.pth")
    assert checkpoint["epoch"] == 1
    assert _differing_keys(good, checkpoint["model"]) == []


def test_gradient_clipping_bounds_the_total_gradient_norm(data_root: Path, tmp_path: Path) -> None:
    max_norm = 1e-3
    norms = {}
    for clip in (0.0, max_norm):
        trainer = Trainer(tiny_config(tmp_path / str(clip), data_root, f"clip_max_norm={clip}"))
        step = trainer.optimizer.step

        def record(
            *args: Any, _trainer: Trainer = trainer, _step: Any = step, _clip: float = clip, **kwargs: Any
        ) -> Any:
            grads = [p.grad for p in _trainer.model.parameters() if p.grad is not None]
            norms[_clip] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            return _step(*args, **kwargs)

        trainer.optimizer.step = record
        trainer.train_loader.set_epoch(0)
        images, targets = next(iter(trainer.train_loader))
        assert trainer.train_step(images, targets, 0) is not None
        trainer.optimizer_step()
    assert norms[0.0] > 10 * max_norm, "the test needs a gradient larger than the clip"
    assert norms[max_norm] <= max_norm * (1 + 1e-4)


def test_freeze_regexes_freeze_matching_parameters_which_then_stay_unchanged(
    data_root: Path, tmp_path: Path
) -> None:
    patterns = ["^backbone[.]stem[.]", "decoder[.]enc_output[.]"]
    cfg = tiny_config(tmp_path, data_root, f"freeze={patterns}", epochs=1)
    trainer = Trainer(cfg)
    names = [name for name, _ in trainer.model.named_parameters()]
    expected = {n for n in names if any(re.search(p, n) for p in patterns)}
    built_frozen = {n for n, p in dfine.build_model(cfg).named_parameters() if not p.requires_grad}
    assert expected and set(trainer.frozen) == expected | built_frozen
    before = _clone_state(trainer.model)
    trainer.fit()
    after = _clone_state(trainer.model)
    changed = set(_differing_keys(before, after))
    assert not changed & expected, f"frozen parameters changed: {sorted(changed & expected)[:5]}"
    assert changed - expected, "the unfrozen parameters must train"
    ema = _clone_state(trainer.ema.module)
    assert all(torch.equal(ema[name], before[name]) for name in expected)


def test_tune_class_map_by_name_keeps_the_class_head_rows_of_classes_the_checkpoint_names(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    # The dataset's classes are circle, square, triangle, star; the checkpoint's (same head size) are ordered
    # differently and lack triangle, so its rows must be remapped, not copied in place.
    names = ["star", "circle", "boat", "square"]
    entries = [{"label": i, "category_id": 10 + i, "name": name} for i, name in enumerate(names)]
    weights = tmp_path / "weights.pth"
    torch.save({"model": reference_run["model"], "label_map": entries}, weights)
    trainer = Trainer(tiny_config(tmp_path, data_root, "tune_class_map=by_name"), tune=str(weights))
    kept = {0: 1, 1: 3, 3: 0}  # circle, square, star -> their checkpoint rows
    heads = [k for k in reference_run["model"] if re.search(r"score_head|denoising_class_embed", k)]
    assert heads
    state = trainer.model.state_dict()
    for key in heads:
        source = reference_run["model"][key]
        for new, old in kept.items():
            torch.testing.assert_close(state[key][new], source[old], rtol=0, atol=0, msg=f"{key} row {new}")
        if key.endswith("weight") and "denoising" not in key:
            assert not torch.equal(state[key][2], source[2]), f"{key}: triangle row was copied from 'boat'"


def test_tune_class_map_by_name_needs_a_checkpoint_with_a_label_map(
    reference_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights.pth"
    torch.save({"model": reference_run["model"]}, weights)
    with pytest.raises(ConfigError, match="label_map"):
        Trainer(tiny_config(tmp_path, data_root, "tune_class_map=by_name"), tune=str(weights))


def test_falling_loss_with_val_ap_stuck_at_zero_warns_once_naming_the_usual_causes(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert zero_ap_warning([{"loss": 3.0, "val_AP": 0.0}, {"loss": 2.0, "val_AP": 0.0}]) is None  # too early
    rising = [{"loss": 1.0 + i, "val_AP": 0.0} for i in range(4)]
    assert zero_ap_warning(rising) is None
    learning = [{"loss": 4.0 - i, "val_AP": 0.0 if i < 3 else 0.01} for i in range(4)]
    assert zero_ap_warning(learning) is None
    trainer = Trainer(tiny_config(tmp_path, data_root))
    trainer.history = [{"loss": 4.0 - i, "val_AP": 0.0} for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="dfine.engine.trainer"):
        trainer._warn_if_ap_stuck_at_zero()
        trainer.history.append({"loss": 0.5, "val_AP": 0.0})
        trainer._warn_if_ap_stuck_at_zero()
    warnings = [r.getMessage() for r in caplog.records if "val AP is 0" in r.getMessage()]
    assert len(warnings) == 1, warnings
    for cause in ("label map", "cxcywh", "num_classes"):
        assert cause in warnings[0]


def test_amp_on_a_cpu_without_native_bf16_falls_back_to_fp32_with_a_warning(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(trainer_module, "_cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dfine.engine.trainer"):
        trainer = Trainer(tiny_config(tmp_path, data_root, "use_amp=true", epochs=1))
    assert trainer.use_amp is False
    assert any("no native bfloat16" in record.getMessage() for record in caplog.records)
    monkeypatch.setattr(trainer_module, "_cpu_has_fast_bf16", lambda: True)
    assert Trainer(tiny_config(tmp_path / "fast", data_root, "use_amp=true", epochs=1)).use_amp is True
